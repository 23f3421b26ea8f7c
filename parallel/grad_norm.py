"""The global gradient norm and clip, shared by both gradient engines (`parallel.grad_engine`).

    sq = <this rank's weighted sum of squared gradient elements>
    norm = total_norm(sq, [tensor_group, stage_group])     # sum over groups, then sqrt
    clip_(grads, norm, max_norm)

Each engine weighs its squares so that summing over the groups counts every element of the
full gradient once (a piece held by r ranks of those groups weighs 1/r); how it gets `sq`
differs (whole gradients, or ZeRO's reduced shards), the combination and the clip do not.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.distributed as dist

EPS = 1e-6  # added to the norm before dividing: a zero gradient is left as it is


def total_norm(sq: torch.Tensor, groups: Iterable[Any]) -> torch.Tensor:
    """sqrt of `sq` (a 0-dim float32 tensor, summed in place) summed over each process group of
    `groups` in order; None entries (a group of one rank) are skipped."""
    for group in groups:
        if group is not None:
            dist.all_reduce(sq, group=group)
    return sq.sqrt()


def clip_(grads: Iterable[torch.Tensor | None], norm: torch.Tensor, max_norm: float) -> None:
    """Scale `grads` in place by min(1, max_norm / (norm + EPS)), so that their global norm is at
    most `max_norm` (0 disables); None entries are skipped."""
    if max_norm <= 0:
        return
    scale = torch.clamp(max_norm / (norm + EPS), max=1.0)
    for g in grads:
        if g is not None:
            g.mul_(scale.to(g.device))
