"""ZeRO stages 0-3 over the data-parallel group (dp x cp), with an AdamW that updates only this
rank's shard (optionally on the host: `parallel.offload`).

    engine = zero.apply(model, plan, grid, optim_cfg)   # after materialize; replaces
                                                           # DataParallel + torch.optim.AdamW
    engine.zero_grad(); per microbatch: engine.sync = last; forward; backward
    engine.finish(); norm = engine.grad_norm(pp_group); engine.clip(norm, max); engine.step(lr)

Parameters are grouped in units (one per transformer Block, one "root" unit for the embeddings,
final norm and head), each laid out in one flat buffer split evenly over the d ranks
(`parallel.zero_units`). Collectives work on whole units, never one tensor at a time.

- stage 0: plain data parallelism through the same engine (gradients all-reduced per unit,
  every rank updates everything): what optimizer offload uses without ZeRO.
- stage 1: optimizer states (Adam m, v; the fp32 parameters are the master weights) for my
  shard only. On the last microbatch each unit's gradient is reduce-scattered as soon as backward
  has produced all of it; after the update every unit is all-gathered in place.
- stage 2: plus gradients: each unit's gradient is reduce-scattered into my shard during every
  backward (asynchronously, at most MAX_INFLIGHT pending) and the full gradient is dropped, so
  `sync` is not needed (no full gradient outlives its unit's backward).
- stage 3: plus parameters: a Block's flat buffer is all-gathered just before its forward (the
  next Block's gather is launched at the same time: prefetch in execution order), freed after
  its forward, gathered again when backward reaches the Block's output (prefetching the Block
  before it), and freed when its gradient has been reduce-scattered. Freeing resizes the flat
  buffer's storage to zero; parameters stay views of it, so autograd's saved references see the
  regathered values. Recomputation (`parallel.recompute`) runs inside the Block's backward, after
  the gather. The root unit is gathered on first use in a step and freed in `finish()`.

Gradients are SUMMED over the group (the trainer divides the loss by the global token count).

Checkpoints (`checkpoint_state`): keyed by the layout-independent parameter names, optimizer
state `<param>.<exp_avg|exp_avg_sq|step>` as `axon.checkpoint` writes it. Replicated tensors are
plain; a sharded piece is a ShardedTensor of the parameter's full shape whose local shards are
row-aligned boxes viewing the flat buffers (see `parallel.zero_units`), so DCP reshards between
any stages and group sizes and loads in place. Call `after_load()` after loading.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from launch.grid import Axis, Grid
from parallel.offload import HostAdamW
from parallel.zero_optim import Optim, ShardAdamW
from parallel.zero_units import Layout, Slot, sharded_view
from perfmodel.specs import Plan

MAX_INFLIGHT = 2  # stage 2/3: reduce-scatters pending before the oldest is waited on (bounds memory)


@dataclass
class Unit:
    name: str
    layout: Layout
    full: torch.Tensor  # flat parameters [padded]; stage 3: storage freed between uses
    shard: torch.Tensor  # my parameters [shard]: a view of `full`, own storage under stage 3
    grad_full: torch.Tensor | None  # stage 0/1: flat gradients [padded]; each .grad is a view
    grad_shard: torch.Tensor  # my reduced gradient [shard]
    staging: torch.Tensor | None = None  # stage 2/3: this backward's local gradients [padded]
    pending: int = 0  # parameters whose gradient has not arrived in this backward
    launched: bool = False
    state: str = "ready"  # stage 3: free | gathering | ready
    gather: Any = None  # stage 3: in-flight all-gather


@dataclass
class ZeroStats:
    bytes_reduced: int = 0  # bytes sent into reduce-scatters / all-reduces
    bytes_gathered: int = 0  # bytes received by all-gathers
    launched_in_backward: int = 0
    gathers: int = 0
    wait_s: float = 0.0


class ZeroEngine:
    def __init__(self, model: nn.Module, stage: int, group: Axis, optim_cfg: Optim, offload: bool):
        if stage not in (0, 1, 2, 3):
            raise ValueError(f"parallel.zero={stage} must be 0, 1, 2 or 3")
        self.stage, self.group, self.size = stage, group.group, group.size
        self.ranks = group.ranks
        self.sync = True
        self.stats = ZeroStats()
        self._inflight: list[tuple[Unit, Any, torch.Tensor | None, torch.Tensor | None]] = []
        self._unit_of: dict[nn.Parameter, tuple[Unit, Slot]] = {}
        self.units: list[Unit] = []
        self._hooks: list[Any] = []
        blocks, root_named = _split(model)
        for name, module, named in blocks + [("root", None, root_named)]:
            if named:
                self.units.append(self._make_unit(name, named))
        self._blocks = [u for u in self.units if u.name != "root"]
        if stage == 3:
            self._register_stage3(model, blocks)
        for p in self._unit_of:
            self._hooks.append(p.register_post_accumulate_grad_hook(self._on_grad))
        shards = [u.shard for u in self.units]
        decay = [u.layout.decay_ranges() for u in self.units]
        self.optimizer = (HostAdamW if offload else ShardAdamW)(shards, decay, optim_cfg)
        self.zero_grad()

    # ---- layout ----
    def _make_unit(self, name: str, named: list[tuple[str, nn.Parameter]]) -> Unit:
        d, coord = (1, 0) if self.stage == 0 else (self.size, self.ranks.index(dist.get_rank()))
        layout = Layout(named, d, coord)
        p0 = named[0][1]
        full = torch.zeros(layout.padded, dtype=p0.dtype, device=p0.device)
        lo, hi = layout.owned()
        with torch.no_grad():
            for s in layout.slots:
                full[s.start:s.stop].copy_(s.param.detach().reshape(-1))
                s.param.data = full[s.start:s.stop].view(s.shape)  # parameters view the flat buffer
        shard = full[lo:hi].clone() if self.stage == 3 else full[lo:hi]
        grad_full = None
        if self.stage <= 1:
            grad_full = torch.zeros_like(full)
            for s in layout.slots:
                s.param.grad = grad_full[s.start:s.stop].view(s.shape)  # autograd accumulates here
            grad_shard = grad_full[lo:hi]
        else:
            grad_shard = torch.zeros_like(shard)
        unit = Unit(name, layout, full, shard, grad_full, grad_shard)
        for s in layout.slots:
            self._unit_of[s.param] = (unit, s)
        if self.stage == 3:
            self._free(unit)
        return unit

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

    def _on_grad(self, p: torch.Tensor) -> None:
        u, s = self._unit_of[p]
        if self.stage >= 2:
            if u.staging is None:
                u.staging = torch.zeros(u.layout.padded, dtype=u.full.dtype, device=u.full.device)
            u.staging[s.start:s.stop].add_(p.grad.reshape(-1))
            p.grad = None  # the full gradient lives only in the unit's staging buffer
        elif not self.sync:
            return
        u.pending -= 1
        if u.pending == 0:
            self._launch(u)
            self.stats.launched_in_backward += 1
            if self.stage == 3 and u.name != "root":
                self._free(u)

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
            out = torch.empty_like(u.grad_shard)
        handle = None
        if self.size > 1:
            self.stats.bytes_reduced += src.numel() * src.element_size()
            if out is None:
                handle = dist.all_reduce(src, group=self.group, async_op=True)
            else:
                handle = dist.reduce_scatter_single(out, src, group=self.group, async_op=True)
        elif out is not None:
            out.copy_(src)
        self._inflight.append((u, handle, out, src))
        if self.stage >= 2:
            while len(self._inflight) > MAX_INFLIGHT:
                self._complete(self._inflight.pop(0))

    def _complete(self, item: tuple[Unit, Any, torch.Tensor | None, torch.Tensor | None]) -> None:
        u, handle, out, _ = item
        if handle is not None:
            handle.wait()
        if self.stage == 1:
            u.grad_shard.copy_(out)
        elif self.stage >= 2:
            u.grad_shard.add_(out)

    def finish(self) -> None:
        """Launch what backward did not, wait for every reduction; call before the optimizer."""
        start = time.perf_counter()
        for u in self.units:
            if self.stage >= 2 and u.staging is not None:
                self._launch(u)
            elif self.stage <= 1 and self.sync and not u.launched:
                self._launch(u)
        while self._inflight:
            self._complete(self._inflight.pop(0))
        if self.stage == 3:
            for u in self.units:
                self._free(u)
        self.stats.wait_s += time.perf_counter() - start

    def grad_norm(self, stage_group: Any = None) -> torch.Tensor:
        """L2 norm of the full (reduced) gradient; `stage_group` sums over pipeline stages."""
        sq = torch.stack([u.grad_shard.float().pow(2).sum() for u in self.units]).sum()
        if self.stage >= 1 and self.size > 1:
            dist.all_reduce(sq, group=self.group)
        if stage_group is not None:
            dist.all_reduce(sq, group=stage_group)
        return sq.sqrt()

    def clip(self, norm: torch.Tensor, max_norm: float) -> None:
        """Scale gradients so their global norm is at most `max_norm` (0 disables), as optim.clip_."""
        if max_norm <= 0:
            return
        scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for u in self.units:
            u.grad_shard.mul_(scale.to(u.grad_shard.device))

    # ---- optimizer ----
    def step(self, lr: float) -> None:
        """Update my shard, then (stages 1-2) all-gather every unit in place."""
        self.optimizer.step([u.grad_shard for u in self.units], lr)
        if self.stage in (1, 2) and self.size > 1:
            handles = [dist.all_gather_single(u.full, u.shard, group=self.group, async_op=True) for u in self.units]
            for h in handles:
                h.wait()
            self.stats.bytes_gathered += sum(u.full.numel() * u.full.element_size() for u in self.units)

    # ---- stage 3: gather / free ----
    def _gather(self, u: Unit, wait: bool = True) -> None:
        if u.state == "free":
            u.full.untyped_storage().resize_(u.full.numel() * u.full.element_size())
            if self.size > 1:
                u.gather = dist.all_gather_single(u.full, u.shard, group=self.group, async_op=True)
                self.stats.bytes_gathered += u.full.numel() * u.full.element_size()
            else:
                u.full.copy_(u.shard)
            u.state = "gathering"
            self.stats.gathers += 1
        if wait and u.state == "gathering":
            if u.gather is not None:
                u.gather.wait()
                u.gather = None
            u.state = "ready"

    def _free(self, u: Unit) -> None:
        if u.state == "gathering":
            self._gather(u)
        u.full.untyped_storage().resize_(0)
        u.state = "free"

    def _register_stage3(self, model: nn.Module, blocks: list[tuple[str, nn.Module, Any]]) -> None:
        by_name = {u.name: u for u in self.units}
        order = [by_name[name] for name, _, named in blocks if named]
        modules = [m for name, m, named in blocks if named]
        for i, (u, m) in enumerate(zip(order, modules)):
            nxt = order[i + 1] if i + 1 < len(order) else None
            prev = order[i - 1] if i > 0 else None
            self._hooks.append(m.register_forward_pre_hook(lambda mod, args, u=u, nxt=nxt: self._pre_forward(u, nxt)))
            self._hooks.append(m.register_forward_hook(lambda mod, args, out, u=u, prev=prev:
                                                       self._post_forward(u, prev, out)))
        root = by_name.get("root")
        if root is not None:
            owners = {id(m) for m in model.modules() for p in m.parameters(recurse=False) if p in self._unit_of
                      and self._unit_of[p][0] is root}
            for m in model.modules():
                if id(m) in owners:
                    self._hooks.append(m.register_forward_pre_hook(lambda mod, args: self._gather(root)))

    def _pre_forward(self, u: Unit, nxt: Unit | None) -> None:
        self._gather(u)
        if nxt is not None:
            self._gather(nxt, wait=False)  # prefetch: overlaps this Block's forward

    def _post_forward(self, u: Unit, prev: Unit | None, out: Any) -> None:
        if torch.is_grad_enabled() and isinstance(out, torch.Tensor) and out.requires_grad:
            out.register_hook(lambda grad: self._pre_backward(u, prev))
        self._free(u)

    def _pre_backward(self, u: Unit, prev: Unit | None) -> None:
        self._gather(u)
        if prev is not None:
            self._gather(prev, wait=False)  # prefetch in backward order

    # ---- checkpoints ----
    def checkpoint_state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(model_state, optim_state) keyed by parameter name; see the module docstring."""
        opt = self.optimizer
        model_state: dict[str, Any] = {}
        optim_state: dict[str, Any] = {}
        for i, u in enumerate(self.units):
            for s in u.layout.slots:
                if self.stage == 3:
                    model_state[s.name] = sharded_view(u.layout, s, u.shard, self.ranks)
                else:
                    model_state[s.name] = u.full[s.start:s.stop].view(s.shape)
                for key, flat in (("exp_avg", opt.exp_avg[i]), ("exp_avg_sq", opt.exp_avg_sq[i])):
                    if self.stage == 0:
                        optim_state[f"{s.name}.{key}"] = flat[s.start:s.stop].view(s.shape)
                    else:
                        optim_state[f"{s.name}.{key}"] = sharded_view(u.layout, s, flat, self.ranks)
                optim_state[f"{s.name}.step"] = opt.step_count
        return model_state, optim_state

    def after_load(self) -> None:
        """Refresh derived copies after DCP filled `checkpoint_state()` in place."""
        self.optimizer.reload_params()

    def state_tensors(self) -> dict[str, list[torch.Tensor]]:
        """Model-state tensors by role, for `axon.memory` (device and host)."""
        return {"params": [u.full for u in self.units] + [u.shard for u in self.units],
                "grads": [u.grad_full if u.grad_full is not None else u.grad_shard for u in self.units],
                "optimizer": self.optimizer.device_states(), "host": self.optimizer.host_states()}

    def reset_stats(self) -> ZeroStats:
        old, self.stats = self.stats, ZeroStats()
        return old

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []


def _split(model: nn.Module) -> tuple[list[tuple[str, nn.Module, list]], list[tuple[str, nn.Parameter]]]:
    """Blocks (`layers.<i>`, in execution order) with their named parameters, and the rest."""
    blocks = []
    in_block: set[int] = set()
    layers = getattr(model, "layers", {})
    for key, block in layers.items():
        named = [(f"layers.{key}.{n}", p) for n, p in block.named_parameters() if p.requires_grad]
        blocks.append((f"layers.{key}", block, named))
        in_block.update(id(p) for _, p in named)
    root = [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in in_block]
    return blocks, root


def apply(model: nn.Module, plan: Plan, grid: Grid, optim_cfg: Optim) -> ZeroEngine:
    """The ZeRO engine for `plan.zero` / `plan.offload.optimizer` over the dp x cp group, on a
    materialized model; the learning rate is given to each `step(lr)`."""
    return ZeroEngine(model, plan.zero, grid.group("dp", "cp"), optim_cfg, plan.offload.optimizer)
