"""The data-parallel gradient engine (`parallel.grad_engine.GradEngine` without ZeRO): every
rank holds its whole parameters (its tensor-parallel pieces), their gradients and a torch AdamW.

    engine = DataParallelEngine(named, layouts, plan, grid, optim_cfg)
    engine.zero_grad(); per backward: engine.set_last_backward(last); backward
    engine.finish(); norm = engine.grad_norm(pp_group); engine.clip(norm, max); engine.step(lr)

Gradients are summed in overlapped buckets (`parallel.data.DataParallel`) over each parameter's
reduction group (`ParamLayout.grad_axes`: dp x cp, plus the tensor axes a tensor-parallel
parameter is replicated over). The norm weighs a parameter's squares by 1 / copies (the ranks of
the tensor-parallel group holding the same piece) and sums over that group and the pipeline
stages. Mixed precision (`compute_weights`, parallel/precision.py): the parameters stay fp32 (the
masters: AdamW, the fp32 gradient buckets, checkpoints) and a bf16 copy of each, refreshed after
every update, is what the forward reads. Checkpoints: parameters and Adam states
`<param>.<exp_avg|exp_avg_sq|step>` by name, a tensor-parallel piece as a DTensor of the full
tensor (`parallel.layout_dtensor`), so torch.distributed.checkpoint reshards between layouts and
loads in place.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from launch.grid import Grid
from parallel.data import CommStats, DataParallel
from parallel.grad_norm import clip_, total_norm
from parallel.layout import TP_AXES, ParamLayout, decays
from parallel.layout_dtensor import TensorMesh
from parallel.precision import compute_tensor, reduce_dtype
from perfmodel.specs import Optim, Plan


def adamw(named: Mapping[str, nn.Parameter], cfg: Optim, lr: float = 0.0,
          layouts: Mapping[str, ParamLayout] | None = None) -> torch.optim.AdamW:
    """torch AdamW with torch's default implementation choice: the multi-tensor (foreach) kernels
    on GPUs, the per-tensor loop on CPU (the arithmetic `parallel.zero_optim` copies per element,
    so the two engines agree bit for bit there); weight decay by `parallel.layout.decays` of the
    full shape (`layouts`; default the local shape)."""
    decay, no_decay = [], []
    for name, p in named.items():
        if p.requires_grad:
            full = layouts[name].full_shape if layouts is not None else tuple(p.shape)
            (decay if decays(full) else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


def reduction_groups(named: Mapping[str, nn.Parameter], layouts: Mapping[str, ParamLayout],
                     grid: Grid) -> list[tuple[list[nn.Parameter], Any, int]]:
    """Parameters grouped by the grid axes their gradients are summed over, as DataParallel
    takes them: [(params, process group, size)], groups in order of first appearance."""
    by_axes: dict[tuple[str, ...], list[nn.Parameter]] = {}
    for name, p in named.items():
        by_axes.setdefault(tuple(layouts[name].grad_axes), []).append(p)
    return [(params, grid.group(*axes).group, grid.group(*axes).size) for axes, params in by_axes.items()]


class DataParallelEngine:
    """See the module docstring; `named` and `layouts` are keyed by parameter name."""

    def __init__(self, named: Mapping[str, nn.Parameter], layouts: Mapping[str, ParamLayout], plan: Plan,
                 grid: Grid, optim_cfg: Optim):
        self.named, self.layouts = dict(named), layouts
        self.dp = DataParallel(reduction_groups(self.named, layouts, grid), bucket_mb=plan.bucket_mb,
                               overlap=plan.overlap_grad_reduce, reduce_dtype=reduce_dtype(plan.reduce_dtype))
        self.optimizer = adamw(self.named, optim_cfg, layouts=layouts)
        weight_of = {p: 1.0 / layouts[name].copies(plan) for name, p in self.named.items()}  # norm: 1 / copies
        self._norm_parts = _norm_parts(self.dp.buckets, weight_of)
        tp = grid.group(*TP_AXES)
        self.tensor_group = tp.group if tp.size > 1 else None
        self.mesh = TensorMesh(grid)
        self.compute: dict[nn.Parameter, torch.Tensor] = {}  # mixed precision: master -> compute copy

    def compute_weights(self, dtype: torch.dtype) -> dict[nn.Parameter, torch.Tensor]:
        """{parameter: its `dtype` copy}, made now and refreshed after every update (call once)."""
        self.compute = {p: compute_tensor(torch.empty(p.shape, dtype=dtype, device=p.device))
                        for p in self.named.values() if p.is_floating_point()}
        self._refresh()
        return self.compute

    def _refresh(self) -> None:
        with torch.no_grad():
            for p, w in self.compute.items():
                w.copy_(p)

    # ---- gradients ----
    def zero_grad(self) -> None:
        self.dp.zero_grad()

    def set_last_backward(self, last: bool) -> None:
        self.dp.set_last_backward(last)

    def finish(self) -> None:
        self.dp.finish()

    def after_forward(self) -> None:
        """After a forward-only pass: nothing is gathered or pending here."""

    def grad_norm(self, stage_group: Any = None) -> torch.Tensor:
        """L2 norm of the full gradient: squares weighted by 1 / copies, summed over the tensor
        group and `stage_group` (the pipeline stages). Read from the flat gradient buckets, a dot
        product per bucket (`_norm_parts`)."""
        device = next(iter(self.named.values())).device
        sq = torch.zeros((), dtype=torch.float32, device=device)
        for flat, weight in self._norm_parts:
            g = flat.float()  # [numel]
            sq += torch.dot(g, g) * weight
        return total_norm(sq, (self.tensor_group, stage_group))

    def clip(self, norm: torch.Tensor, max_norm: float) -> None:
        clip_([flat for flat, _ in self._norm_parts], norm, max_norm)

    def nonfinite(self) -> list[str]:
        """Names of my parameters whose reduced gradient holds a NaN/Inf (a failure-path check)."""
        return [name for name, p in self.named.items() if p.grad is not None and not p.grad.isfinite().all()]

    def step(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self._refresh()

    # ---- checkpoints and memory ----
    def state_dict(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(model_state, optim_state) by parameter name, viewing this rank's tensors (a load fills
        them in place); Adam states that do not exist yet are created as zeros."""
        present = self.mesh.to_dtensor  # a tensor-parallel piece as a DTensor; others as they are
        model_state = {name: present(self.layouts[name], p.data) for name, p in self.named.items()}
        optim_state: dict[str, Any] = {}
        self.create_states()
        for name, p in self.named.items():
            for key, value in self.optimizer.state[p].items():
                optim_state[f"{name}.{key}"] = present(self.layouts[name], value) if value.dim() > 0 else value
        return model_state, optim_state

    def create_states(self) -> None:
        """Create the Adam states torch AdamW has not yet (it does so at a parameter's first
        update; a skipped step leaves them uncreated), as zeros."""
        for p in self.named.values():
            st = self.optimizer.state[p]
            if not st:
                st["step"] = torch.zeros((), dtype=torch.float32)
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def after_load(self, model_state: Mapping[str, Any], optim_state: Mapping[str, Any]) -> None:
        """The loaded tensors are the parameters and states themselves; refresh the compute copies."""
        self._refresh()

    def state_tensors(self) -> dict[str, list[torch.Tensor]]:
        """Model-state tensors by role, for `axon.memory`: parameters, the flat gradient buckets,
        the torch AdamW states (mixed precision: params include the compute copies)."""
        states = [v for st in self.optimizer.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
        return {"params": list(self.named.values()) + list(self.compute.values()),
                "grads": [b.buffer for b in self.dp.buckets],
                "optimizer": states, "host": []}

    def reset_stats(self) -> CommStats:
        return self.dp.reset_stats()

    def remove(self) -> None:
        self.dp.remove()


def _norm_parts(buckets: list, weight_of: Mapping[nn.Parameter, float]) -> list[tuple[torch.Tensor, float]]:
    """[(flat gradient [numel], norm weight)] covering every bucketed gradient once: a bucket's
    whole buffer where its parameters share a weight (the usual case: a bucket holds one reduction
    group, whose parameters are replicated over the same tensor axes), else each parameter's view
    (`.grad` is a view into the buffer for the engine's life: `DataParallel.zero_grad` keeps it)."""
    parts: list[tuple[torch.Tensor, float]] = []
    for b in buckets:
        weights = {weight_of[p] for p in b.params}
        if len(weights) == 1:
            parts.append((b.buffer, weights.pop()))
        else:
            parts.extend((p.grad.view(-1), weight_of[p]) for p in b.params)
    return parts
