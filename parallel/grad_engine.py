"""`GradEngine`: what the trainer and the pipeline executor drive to turn backward's gradients
into an optimizer step, and `build`, which picks one of its two implementations.

    engine = build(chunks, named, layouts, plan, grid, optim_cfg)   # after materialize
    engine.zero_grad()
    per backward: engine.set_last_backward(last); backward          # (the executor does this)
    engine.finish(); norm = engine.grad_norm(pp_group); engine.clip(norm, max_norm); engine.step(lr)

- `parallel.data_engine.DataParallelEngine`: bucketed, overlapped all-reduce and torch AdamW;
  every rank holds its whole parameters, gradients and optimizer states.
- `parallel.zero.ZeroEngine`: ZeRO stages 1-3 and optimizer offload (stage 0 with offload),
  sharded over each parameter's gradient-reduction group.

Both sum gradients over each parameter's reduction group (`ParamLayout.grad_axes`; the trainer
divides the loss by the global token count), combine the norm and clip with `parallel.grad_norm`,
and present checkpoints by layout-independent parameter name, so one written by either loads
into the other under any layout (docs/architecture.md, "One training step").
"""
from __future__ import annotations

from typing import Any, Mapping, Protocol, Sequence

import torch
from torch import nn

from launch.grid import Grid
from parallel import zero
from parallel.data_engine import DataParallelEngine
from parallel.layout import ParamLayout
from perfmodel.specs import Optim, Plan


class GradEngine(Protocol):
    def zero_grad(self) -> None:
        """Zero the gradients and re-arm the reductions for the next step."""

    def set_last_backward(self, last: bool) -> None:
        """Whether the coming backward is the last of the step for the parameters it reaches
        (only then is a gradient final and reduced); True unless told otherwise."""

    def finish(self) -> None:
        """Launch the reductions backward did not and wait for all; call before `grad_norm`."""

    def after_forward(self) -> None:
        """After a forward-only pass (the validation loss: no backward, no gradients), release what
        the forward left gathered (ZeRO-3), so the next step starts as it would have without it."""

    def grad_norm(self, stage_group: Any = None) -> torch.Tensor:
        """The L2 norm of the full reduced gradient (0-dim float32), the same on every rank;
        `stage_group` (the pipeline stages, or None) sums the stages' parts."""

    def clip(self, norm: torch.Tensor, max_norm: float) -> None:
        """Scale the gradients by min(1, max_norm / (norm + eps)) (`max_norm` 0 disables)."""

    def compute_weights(self, dtype: torch.dtype) -> dict[nn.Parameter, torch.Tensor]:
        """Per parameter, the tensor the forward computes with in `dtype` (parallel/precision.py):
        a copy refreshed after every step and load (ZeRO-3: of the gathered unit), or the
        parameter itself in its own dtype."""

    def nonfinite(self) -> list[str]:
        """Names of this rank's parameters whose reduced gradient (or my shard of it) holds a
        NaN/Inf; for the non-finite guard's report (axon/nonfinite.py), on its failure path only."""

    def step(self, lr: float) -> None:
        """One AdamW update at learning rate `lr`."""

    def state_dict(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(model_state, optim_state) for torch.distributed.checkpoint: tensors keyed by parameter
        name and `<param>.<exp_avg|exp_avg_sq|step>`, viewing the engine's own memory or (ZeRO
        shards) a per-parameter copy of it; a load fills them in place, then call `after_load`
        with them."""

    def create_states(self) -> None:
        """Create every optimizer state now (one an update has not created yet), so that memory
        and checkpoints see them all."""

    def after_load(self, model_state: Mapping[str, Any], optim_state: Mapping[str, Any]) -> None:
        """Take the loaded values back from `state_dict()`'s dicts (filled by the load) and
        refresh what derives from them (e.g. offloaded master weights, compute copies)."""

    def state_tensors(self) -> dict[str, list[torch.Tensor]]:
        """Model-state tensors by role (params, grads, optimizer, host) for `axon.memory`."""

    def remove(self) -> None:
        """Remove the gradient hooks (the engine is unusable afterwards)."""


def build(chunks: Sequence[nn.Module], named: Mapping[str, nn.Parameter], layouts: Mapping[str, ParamLayout],
          plan: Plan, grid: Grid, optim_cfg: Optim) -> GradEngine:
    """The engine for `plan` over this rank's materialized pipeline chunks: ZeRO when
    `plan.zero > 0` or `plan.offload.optimizer`, else data parallelism. `named`: the chunks'
    parameters by name; `layouts`: the layout of every one of them."""
    if plan.zero > 0 or plan.offload.optimizer:
        return zero.apply(list(chunks), plan, grid, optim_cfg, layouts)
    return DataParallelEngine(named, layouts, plan, grid, optim_cfg)
