"""ZeRO stages 0-3 over each parameter's gradient-reduction group (dp x cp, and the tensor axes a
tensor-parallel parameter is replicated over), with an AdamW that updates only this rank's shard
(optionally on the host: `parallel.offload`).

    engine = zero.apply(chunks, plan, grid, optim_cfg, layouts)   # after materialize; usually
                                                                   # through parallel.grad_engine.build
    engine.zero_grad(); per backward: engine.set_last_backward(last); backward
    engine.finish(); norm = engine.grad_norm(pp_group); engine.clip(norm, max); engine.step(lr)

Parameters are grouped in units (per pipeline chunk: one per transformer Block and reduction
group, one "root" unit per group for the embeddings, final norm and head), each laid out in one
flat buffer split evenly over the d ranks of its group (`parallel.zero_units`; the `Unit` record and
its making: `parallel.zero_build`). Collectives work
on whole units, never one tensor at a time. Under tensor parallelism a rank's local pieces are
what gets sharded: depth-sharded weights over dp x cp, parameters replicated over tp_depth (norms,
biases) over dp x cp x tp_depth (`ParamLayout.grad_axes`), so each unit's group holds ranks
with identical values. Several chunks per rank (interleaved, V schedules) simply give more
units; a unit's reduction starts when all its parameters' gradients have arrived in this backward,
so under a split backward (B/W) it waits for the W action that completes the weights.

- stage 0: plain data parallelism through the same engine (gradients all-reduced per unit,
  every rank updates everything): what optimizer offload uses without ZeRO.
- stage 1: optimizer states (Adam m, v; the fp32 parameters are the master weights) for my
  shard only. On the last microbatch each unit's gradient is reduce-scattered as soon as backward
  has produced all of it; after the update every unit is all-gathered in place.
- stage 2: plus gradients: in every backward a unit's gradient accumulates in a flat staging
  buffer (on its first gradient the parameters' `.grad` become views of it: no per-parameter
  gradient tensors, no copy), is reduce-scattered into my shard as soon as it is complete
  (asynchronously, at most MAX_INFLIGHT pending) and the staging buffer is dropped at launch, so
  `set_last_backward` is not needed (no full gradient outlives its unit's backward).
- stage 3: plus parameters: a Block's flat buffer is gathered just before its forward and its
  backward (prefetching the next / previous Block) and freed after its forward and as soon as its
  gradient is complete, before the reduce-scatter allocates (`parallel.zero_stage3`: the
  schedule, recomputation, split backward, the root units).

Gradients are SUMMED over the group (the trainer divides the loss by the global token count).

Mixed precision (`compute_weights`, parallel/precision.py), as Megatron's distributed optimizer
and FSDP2 keep it: the fp32 masters live with the optimizer (gradients accumulate in fp32 and are
reduced in fp32, or in a bf16 copy under `parallel.reduce_dtype=bf16`) and each unit gets a flat
compute buffer `cfull` in the compute dtype, which the forward reads. Stage 0 keeps the whole fp32
`full` and refreshes `cfull` from it after every update. Stages 1-2 keep only my fp32 shard (its own
storage; `full` is freed): after the update it is cast into my slice of `cfull` (`cshard`) and
`cfull` is all-gathered in place, so the gathers move bf16 and a rank holds 2 + 4/d bytes of
weights per parameter (the totals per stage: perfmodel/memory.py `model_states`). Stage 3 keeps a
compute copy `cshard` of my shard (refreshed after every update) and gathers and frees `cfull` from
it. In fp32, `cfull` is `full` and `cshard` is `shard`.

Checkpoints (`state_dict`): keyed by the layout-independent parameter names, optimizer
state `<param>.<exp_avg|exp_avg_sq|step>` as the data-parallel engine keys it. Whole pieces
(weights where `full` is kept: stage 0, fp32 stages 1-2; stage-0 Adam states) are the plain
tensor or, tensor-parallel, a DTensor (parallel/layout_dtensor.py); a ZeRO-sharded tensor is
exchanged into this rank's chunk of rows of each parameter's piece and presented as a DTensor
sharded once more over the ZeRO group (parallel/zero_dtensor.py), so DCP reshards between any
stages, group sizes and tensor layouts. Pass the loaded dicts to `after_load`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn

from launch.grid import Grid
from parallel.grad_norm import clip_, total_norm
from parallel.layout import ParamLayout
from parallel.layout import complete as complete_layouts
from parallel.offload import HostAdamW
from parallel.precision import compute_tensor, reduce_dtype
from parallel.zero_comm import gather
from parallel.zero_stage3 import Residency
from parallel.zero_optim import ShardAdamW
from parallel.zero_build import Unit, make_units
from parallel.layout_dtensor import TensorMesh
from parallel.zero_dtensor import ZeroView, local
from parallel.zero_units import Slot, split_blocks
from perfmodel.specs import Optim, Plan

MAX_INFLIGHT = 2  # stage 2/3: reduce-scatters pending before the oldest is waited on (bounds memory)


@dataclass
class ZeroStats:
    bytes_reduced: int = 0  # bytes sent into reduce-scatters / all-reduces
    bytes_gathered: int = 0  # bytes received by all-gathers
    launched_in_backward: int = 0
    gathers: int = 0
    wait_s: float = 0.0


class ZeroEngine:
    """The ZeRO implementation of `parallel.grad_engine.GradEngine` (see the module docstring);
    `stage` is 0-3 (perfmodel/rules.py validated it), 0 only with optimizer offload."""

    def __init__(self, chunks: list[nn.Module], stage: int, grid: Grid, optim_cfg: Optim, offload: bool,
                 layouts: Mapping[str, ParamLayout] | None = None, wire: torch.dtype | None = None):
        """`wire`: the dtype gradients are reduced in (None: their own; parallel/precision.py
        `reduce_dtype`)."""
        self.stage, self.grid, self.wire = stage, grid, wire
        self._last_backward = True  # stage 0/1: this backward is the step's last; reduce what it completes
        self.stats = ZeroStats()
        self._inflight: list[tuple[Unit, Any, torch.Tensor | None]] = []
        self._unit_of: dict[nn.Parameter, tuple[Unit, Slot]] = {}
        self.units: list[Unit] = []
        self._hooks: list[Any] = []
        self._res = Residency(lambda: self.stats)
        self.sharded_master = stage == 3  # the fp32 weights exist only as my shard (and stages 1-2 mixed)
        self._dpc, self._tp = grid.group("dp", "cp"), grid.group("tp_col", "tp_row", "tp_depth")
        self._mesh, self._zero_views = TensorMesh(grid), None  # checkpoints' DTensor meshes, built on first use
        params = {name: p for chunk in chunks for name, p in chunk.named_parameters()}
        self.layouts = complete_layouts(layouts or {}, params)
        for c, chunk in enumerate(chunks):
            blocks, root_named = split_blocks(chunk)
            by_block = [(m, self._make_units(name, named)) for name, m, named in blocks]
            root = self._make_units(f"chunk{c}", root_named, root=True)
            if stage == 3:
                self._hooks += self._res.register(chunk, by_block, root)
        for p in self._unit_of:
            self._hooks.append(p.register_post_accumulate_grad_hook(self._on_grad))
        shards = [u.shard for u in self.units]
        decay = [u.layout.decay_ranges() for u in self.units]
        self.optimizer = (HostAdamW if offload else ShardAdamW)(shards, decay, optim_cfg)
        self.zero_grad()

    # ---- layout ----
    def _make_units(self, name: str, named: list[tuple[str, nn.Parameter]], root: bool = False) -> list[Unit]:
        """`zero_build.make_units` for this engine: its units, each parameter's hook entry, and
        under stage 3 their flat buffers freed until first use."""
        units = []
        for unit in make_units(name, named, root, self.stage, self.grid, self.layouts):
            for s in unit.layout.slots:
                self._unit_of[s.param] = (unit, s)
            if self.stage == 3:
                self._res.free(unit)  # before the next unit's buffers are allocated
            units.append(unit)
        self.units += units
        return units

    def compute_weights(self, dtype: torch.dtype) -> dict[nn.Parameter, torch.Tensor]:
        """Give every unit a compute buffer in `dtype` (see the module docstring; call once, before
        the first step) and return {parameter: its compute tensor, a view of the buffer}."""
        out: dict[nn.Parameter, torch.Tensor] = {}
        for u in self.units:
            if self.stage == 3:
                if u.state != "free":
                    raise RuntimeError("compute_weights: call before the first step")
                u.cshard = u.shard.to(dtype)  # [shard]
                u.cfull = torch.zeros(u.layout.padded, dtype=dtype, device=u.full.device)
            elif self.stage == 0:
                u.cfull = u.full.to(dtype)  # [padded]
            else:  # stages 1-2: the master becomes my shard alone
                lo, hi = u.layout.owned()
                u.shard = u.full[lo:hi].clone()  # [shard] fp32, own storage
                u.cfull = u.full.to(dtype)  # [padded]
                u.cshard = u.cfull[lo:hi]  # gathered in place
                u.full.untyped_storage().resize_(0)  # the replicated fp32 weights are gone
            for s in u.layout.slots:
                out[s.param] = compute_tensor(u.cfull[s.start:s.stop].view(s.shape))
            if self.stage == 3:
                u.cfull.untyped_storage().resize_(0)  # free, as `full` is
        self.optimizer.use_params([u.shard for u in self.units])
        self.sharded_master = self.stage >= 1
        return out

    def _publish(self) -> None:
        """After an update or a load: what the forward reads takes the masters. Stage 0: the
        compute copy of `full` (nothing in fp32); 1-2: my shard (cast into `cfull` under mixed
        precision) all-gathered in place into `cfull`; 3: the compute shard (gathered on use)."""
        with torch.no_grad():
            for u in self.units:
                if u.cshard is not u.shard:
                    u.cshard.copy_(u.shard)
                if self.stage == 0 and u.cfull is not u.full:
                    u.cfull.copy_(u.full)
            if self.stage in (1, 2):
                units = [u for u in self.units if u.group.size > 1]
                for h in [gather(u.cfull, u.cshard, u.group) for u in units]:
                    h.wait()
                self.stats.bytes_gathered += sum(u.cfull.numel() * u.cfull.element_size() for u in units)

    # ---- gradients ----
    def zero_grad(self) -> None:
        """Zero the gradients and re-arm every unit for the next step."""
        for u in self.units:
            if u.grad_full is not None:
                u.grad_full.zero_()
            else:
                u.grad_shard.zero_()
            u.staging = None
            u.pending = len(u.layout.slots)
            u.launched = False

    def set_last_backward(self, last: bool) -> None:
        """Stage 0/1: whether the coming backward is the step's last for its units (only then
        are their gradients reduced); stages 2-3 reduce every backward."""
        self._last_backward = last

    def _on_grad(self, p: torch.Tensor) -> None:
        u, s = self._unit_of[p]
        if self.stage >= 2 and u.staging is None:
            self._stage(u, s)
        elif self.stage <= 1 and not self._last_backward:
            return
        u.pending -= 1
        if u.pending == 0:
            if self.stage == 3 and not u.root:
                self._res.free(u)  # before the reduction's buffers are allocated
            self._launch(u)
            self.stats.launched_in_backward += 1

    def _stage(self, u: Unit, first: Slot) -> None:
        """Stage 2/3, on the unit's first gradient of this backward: a flat staging buffer takes its
        value and every parameter's `.grad` becomes a view of the buffer, so autograd accumulates the
        others in place (no per-parameter gradient tensors, no copy)."""
        u.staging = torch.zeros(u.layout.padded, dtype=u.full.dtype, device=u.full.device)
        u.staging[first.start:first.stop].copy_(first.param.grad.reshape(-1))
        for s in u.layout.slots:
            s.param.grad = u.staging[s.start:s.stop].view(s.shape)

    def _launch(self, u: Unit) -> None:
        """Start reducing `u`'s gradient: all-reduce (stage 0), reduce-scatter (1-3)."""
        u.launched = True
        u.pending = len(u.layout.slots)
        if self.stage == 0:
            src, out = u.grad_full, None
        elif self.stage == 1:
            src, out = u.grad_full, torch.empty_like(u.grad_shard)
        else:
            src, u.staging = u.staging, None
            for s in u.layout.slots:  # the gradient now lives only in `src`
                s.param.grad = None
            out = torch.empty_like(u.grad_shard)
        handle = None
        if u.group.size > 1 and self.wire not in (None, src.dtype):  # reduce a copy; _complete adds it back
            src = src.to(self.wire)  # [padded]
            out = src if out is None else torch.empty(out.shape, dtype=self.wire, device=out.device)
        if u.group.size > 1:
            self.stats.bytes_reduced += src.numel() * src.element_size()
            if out is None or out is src:
                handle = dist.all_reduce(src, group=u.group.group, async_op=True)
            else:
                handle = dist.reduce_scatter_single(out, src, group=u.group.group, async_op=True)
        elif out is not None:
            out.copy_(src)
        self._inflight.append((u, handle, out))  # not `src`: the backend keeps what it still reads
        # (gloo copies the reduce-scatter input at launch; NCCL records it on its stream)
        if self.stage >= 2:
            while len(self._inflight) > MAX_INFLIGHT:
                self._complete(self._inflight.pop(0))

    def _complete(self, item: tuple[Unit, Any, torch.Tensor | None]) -> None:
        u, handle, out = item
        if handle is not None:
            handle.wait()
        if self.stage == 0 and out is not None:  # the all-reduced reduce-dtype copy
            u.grad_full.copy_(out)
        elif self.stage == 1:
            u.grad_shard.copy_(out)
        elif self.stage >= 2:
            u.grad_shard.add_(out)

    def finish(self) -> None:
        """Launch what backward did not, wait for every reduction; call before the optimizer."""
        start = time.perf_counter()
        for u in self.units:
            if self.stage >= 2 and u.staging is not None:
                self._launch(u)
            elif self.stage <= 1 and self._last_backward and not u.launched:
                self._launch(u)
        while self._inflight:
            self._complete(self._inflight.pop(0))
        if self.stage == 3:
            for u in self.units:
                self._res.free(u)
        self.stats.wait_s += time.perf_counter() - start

    def after_forward(self) -> None:
        """After a forward-only pass (no backward, no gradients: the validation loss): stage 3
        frees what its forward left gathered (the root units; Blocks free themselves after their
        forward), so the next step starts as it would have without it."""
        if self.stage == 3:
            for u in self.units:
                self._res.free(u)

    def grad_norm(self, stage_group: Any = None) -> torch.Tensor:
        """L2 norm of the full (reduced) gradient: weighted squares (`Unit.norm`) summed over dp x cp
        (ZeRO 1-3: each rank holds a shard) and the tensor group; `stage_group` sums pipeline stages."""
        device = self.units[0].grad_shard.device if self.units else torch.device("cpu")
        sq = torch.zeros((), dtype=torch.float32, device=device)
        for u in self.units:
            g = u.grad_shard.float()
            for a, b, w in u.norm:
                sq += g[a:b].pow(2).sum() * w
        axes = ([self._dpc] if self.stage >= 1 else []) + [self._tp]
        return total_norm(sq, [a.group for a in axes if a.size > 1] + [stage_group])

    def clip(self, norm: torch.Tensor, max_norm: float) -> None:
        """Scale my gradient shards so the global norm is at most `max_norm` (0 disables)."""
        clip_([u.grad_shard for u in self.units], norm, max_norm)

    def nonfinite(self) -> list[str]:
        """Names of the parameters whose piece of my reduced gradient shard holds a NaN/Inf."""
        out = []
        for u in self.units:
            lo = u.layout.owned()[0]
            out += [s.name for s, a, b in u.layout.pieces()
                    if not u.grad_shard[s.start + a - lo:s.start + b - lo].isfinite().all()]
        return out

    # ---- optimizer ----
    def step(self, lr: float) -> None:
        """Update my shard, then (stages 1-2) all-gather every unit's weights in place."""
        self.optimizer.step([u.grad_shard for u in self.units], lr)
        self._publish()

    # ---- checkpoints ----
    def state_dict(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(model_state, optim_state) keyed by parameter name; see the module docstring. Sharded
        tensors are exchanged into per-parameter row chunks (new memory, `parallel.zero_dtensor`):
        pass the loaded dicts to `after_load`."""
        opt = self.optimizer
        model_state: dict[str, Any] = {}
        optim_state: dict[str, Any] = {}
        for i, (u, view) in enumerate(zip(self.units, self._views())):
            # the fp32 weights: my shard (sharded master), else `full`, every piece whole on this rank
            model_state.update(self._present(u, view, u.shard if self.sharded_master else u.full,
                                             whole=not self.sharded_master))
            for key, flat in (("exp_avg", opt.exp_avg[i]), ("exp_avg_sq", opt.exp_avg_sq[i])):
                states = self._present(u, view, flat, whole=self.stage == 0)
                optim_state.update({f"{name}.{key}": t for name, t in states.items()})
            for s in u.layout.slots:
                optim_state[f"{s.name}.step"] = opt.step_count
        return model_state, optim_state

    def _present(self, u: Unit, view: ZeroView, flat: torch.Tensor, whole: bool) -> dict[str, Any]:
        """{parameter name: its part of `flat`} for DCP: with `whole` (`flat` holds the unit's
        every element) views of it, as the plain tensor or a tensor-parallel DTensor; else (`flat`
        is my shard) the row chunks `view` exchanges it into (new memory), as DTensors."""
        if whole:
            return {s.name: self._mesh.to_dtensor(self.layouts[s.name], flat[s.start:s.stop].view(s.shape))
                    for s in u.layout.slots}
        return {s.name: view.present(s, chunk) for s, chunk in zip(u.layout.slots, view.to_chunks(flat))}

    def create_states(self) -> None:
        """Nothing to do: the shard optimizers create their states with the engine."""

    def after_load(self, model_state: Mapping[str, Any], optim_state: Mapping[str, Any]) -> None:
        """After DCP filled `state_dict()`'s dicts in place: exchange the loaded row chunks back
        into the flat shards, then refresh derived copies."""
        opt = self.optimizer
        for i, (u, view) in enumerate(zip(self.units, self._views())):
            names = [s.name for s in u.layout.slots]
            if self.sharded_master:
                view.restore([local(model_state[n]) for n in names], u.shard)
            if self.stage >= 1:
                for key, flat in (("exp_avg", opt.exp_avg[i]), ("exp_avg_sq", opt.exp_avg_sq[i])):
                    view.restore([local(optim_state[f"{n}.{key}"]) for n in names], flat)
        self.optimizer.reload_params()
        self._publish()

    def _views(self) -> list[ZeroView]:
        """Each unit's exchange with checkpoints (built on first use)."""
        if self._zero_views is None:
            self._zero_views = [ZeroView(u.layout, u.group, self._mesh, self.layouts, u.grad_shard.device)
                                for u in self.units]
        return self._zero_views

    def state_tensors(self) -> dict[str, list[torch.Tensor]]:
        """Model-state tensors by role, for `axon.memory` (device and host)."""
        return {"params": [t for u in self.units for t in (u.full, u.shard, u.cfull, u.cshard)],
                "grads": [u.grad_full if u.grad_full is not None else u.grad_shard for u in self.units],
                "optimizer": self.optimizer.device_states(), "host": self.optimizer.host_states()}

    def reset_stats(self) -> ZeroStats:
        old, self.stats = self.stats, ZeroStats()
        return old

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []


def apply(model: nn.Module | Sequence[nn.Module], plan: Plan, grid: Grid, optim_cfg: Optim,
          layouts: Mapping[str, ParamLayout] | None = None) -> ZeroEngine:
    """The ZeRO engine for `plan.zero` / `plan.offload.optimizer` on this rank's materialized
    pipeline chunks (one module or a list), given every parameter's `ParamLayout` by name
    (`layouts`; parameters not in it are replicated, `parallel.layout.complete`): each parameter's
    local piece is sharded over the group its gradient is summed over (`grad_axes`). The learning
    rate is given to each `step(lr)`."""
    chunks = [model] if isinstance(model, nn.Module) else list(model)
    return ZeroEngine(chunks, plan.zero, grid, optim_cfg, plan.offload.optimizer, layouts,
                      reduce_dtype(plan.reduce_dtype))
