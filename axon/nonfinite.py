"""The non-finite guard: a step whose loss or gradient norm is NaN/Inf never updates the weights.

    guard = NonFiniteGuard(cfg.train.on_nonfinite, cfg.train.max_skips)
    if not finite and not guard.allows(step, loss, norm, engine):   # False: skip the update

`stop` raises `NonFiniteError` before the optimizer step, so no non-finite value reaches the
weights or any checkpoint; `skip` drops the update (the gradients are zeroed by the next step)
and raises once more than `train.max_skips` steps of this run were skipped. Whether a step is
finite is agreed by all ranks (the trainer all-reduces one flag), so all take the same decision.
The report names the first parameter (in model order) whose reduced gradient is non-finite: one
all_gather_object, on the failure path only.
"""
from __future__ import annotations

import re

import torch.distributed as dist

from parallel.grad_engine import GradEngine

NONFINITE_EXIT = 4  # exit code of `axon train` stopped by the guard


class NonFiniteError(RuntimeError):
    """The loss or the gradient norm became NaN/Inf; the message names the step and the fix."""


class NonFiniteGuard:
    """`train.on_nonfinite` (stop | skip, validated with the config) and `train.max_skips`."""

    def __init__(self, on_nonfinite: str, max_skips: int):
        self.on_nonfinite, self.max_skips = on_nonfinite, max_skips
        self.skipped = 0  # steps of this run whose update was skipped

    def allows(self, step: int, loss: float, norm: float, engine: GradEngine) -> bool:
        """Called (on every rank) for a step whose loss or norm was non-finite on some rank:
        False to skip its update, or raises NonFiniteError to stop. `step` is 1-based; collective."""
        where = first_nonfinite(engine)
        what = f"step {step}: loss {loss}, gradient norm {norm}" + (f", first non-finite gradient: {where}"
                                                                     if where else "")
        if self.on_nonfinite == "stop":
            raise NonFiniteError(f"{what}; no update and no checkpoint were written; lower train.lr, "
                                 f"check the data, or set train.on_nonfinite=skip")
        self.skipped += 1
        if self.skipped > self.max_skips:
            raise NonFiniteError(f"{what}; {self.skipped} steps skipped, more than train.max_skips="
                                 f"{self.max_skips}; lower train.lr or check the data")
        return False


def first_nonfinite(engine: GradEngine) -> str:
    """The first parameter in model order (embedding, layers by index, head) whose reduced
    gradient holds a NaN/Inf on any rank; '' when none does (the loss alone was non-finite)."""
    local = engine.nonfinite()
    names = [local]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        names = [None] * dist.get_world_size()
        dist.all_gather_object(names, local)
    found = sorted({n for ns in names for n in (ns or [])}, key=_model_order)
    return found[0] if found else ""


def _model_order(name: str) -> tuple[int, int, str]:
    m = re.match(r"layers\.(\d+)\.", name)
    if m:
        return (1, int(m.group(1)), name)
    return (0 if "emb" in name else 2, 0, name)
