"""The process grid: one `Axis` per parallel dimension, built from a `Plan`.

Rank order, innermost (fastest-varying) first: tp_col, tp_row, tp_depth, cp, dp, pp, so tensor
groups stay inside a node. This module is the only place that creates process groups; all of
them are created up front, in the same order on every rank, as torch.distributed requires.
Axes whose groups hold the same ranks share one process group, and a group of every rank other
than the pipeline's is the default group (dp=8 alone: the default group and one group for each
rank's size-1 axes, where one group per axis made 11 per rank). Every idle gloo group costs each
rank CPU in every step (benchmarks/results/e2e_2026-12-01.md, ninth session: 5-15% of a DDP step
at 8 ranks on 2 cores), and every NCCL one its own buffers. Sharing is safe because a group's
members run the same sequence of its collectives whichever axis names it. Only the pipeline's
stages run different code (point-to-point sends between collectives), so its group is never
shared: no other axis set equals it, and it stays apart from the default group.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from typing import Any, Optional

from perfmodel.specs import AXES, Plan

INNER_FIRST = tuple(reversed(AXES))  # tp_col, tp_row, tp_depth, cp, dp, pp

# Groups over several axes that mechanisms need (created with the single-axis ones).
COMBOS: tuple[tuple[str, ...], ...] = (
    ("dp", "cp"),  # gradient reduction of parameters replicated over the sequence
    ("dp", "cp", "tp_depth"),  # reduction of parameters replicated over depth as well
    ("tp_col", "tp_row", "tp_depth"),  # the whole tensor-parallel group
    ("tp_col", "tp_row"),
    ("dp", "cp", "tp_depth", "tp_col"),  # sequence-parallel residual parameters (norms) under TP
)


def coords_of(plan: Plan, rank: int) -> dict[str, int]:
    """Grid coordinate of `rank` along every axis."""
    out, rest = {}, rank
    for axis in INNER_FIRST:
        size = getattr(plan, axis)
        out[axis] = rest % size
        rest //= size
    return out


def rank_of(plan: Plan, coords: dict[str, int]) -> int:
    rank, stride = 0, 1
    for axis in INNER_FIRST:
        rank += coords[axis] * stride
        stride *= getattr(plan, axis)
    return rank


def group_ranks(plan: Plan, rank: int, axes: tuple[str, ...]) -> list[int]:
    """Global ranks sharing `rank`'s coordinates on every axis not in `axes`, ascending: the
    order torch.distributed gives the process group's ranks (new_group sorts them), so a rank's
    index here is its rank in the group, which rank-ordered collectives (all_gather,
    reduce_scatter) use. For one axis, index i has coordinate i."""
    base = coords_of(plan, rank)
    ranks = []
    for combo in itertools.product(*(range(getattr(plan, a)) for a in axes)):
        c = dict(base)
        c.update(zip(axes, combo))
        ranks.append(rank_of(plan, c))
    return sorted(ranks)


def all_groups(plan: Plan, axes: tuple[str, ...]) -> list[list[int]]:
    """Every group along `axes`, in a deterministic order (by smallest member)."""
    seen: dict[int, list[int]] = {}
    for r in range(plan.world_size):
        ranks = group_ranks(plan, r, axes)
        seen.setdefault(min(ranks), ranks)
    return [seen[k] for k in sorted(seen)]


@dataclass(frozen=True)
class Axis:
    name: str
    size: int
    coord: int  # this rank's index in the group (position in `ranks`)
    ranks: tuple[int, ...]  # global ranks of this rank's group
    group: Any  # torch ProcessGroup (None when the grid was built without torch.distributed)


class Grid:
    """This rank's view of the layout: `grid.axis("dp").group`, `grid.group("dp", "cp")`."""

    def __init__(self, plan: Plan, rank: int, axes: dict[tuple[str, ...], Axis]):
        self.plan = plan
        self.rank = rank
        self._axes = axes

    @classmethod
    def build(cls, plan: Plan, rank: int, world_size: int, *, create_groups: bool = True,
              timeout_s: Optional[float] = None) -> "Grid":
        """`timeout_s` (launch.timeout_s as resolved by launch.dist) bounds every collective of every
        group, as the default group's; None leaves torch's default (10 min NCCL, 30 min gloo)."""
        if plan.world_size != world_size:
            raise ValueError(f"plan covers {plan.world_size} ranks, world has {world_size} (call Plan.check first)")
        new_group = None
        if create_groups:
            import torch.distributed as dist

            timeout = None if timeout_s is None else timedelta(seconds=timeout_s)
            new_group = partial(dist.new_group, timeout=timeout)
        axes: dict[tuple[str, ...], Axis] = {}
        made: dict[tuple[int, ...], Any] = {}  # one process group per distinct set of ranks
        for key in [(a,) for a in INNER_FIRST] + list(COMBOS):
            mine = group_ranks(plan, rank, key)
            group = None
            for ranks in all_groups(plan, key):  # every rank creates every group, same order
                if tuple(ranks) not in made:
                    made[tuple(ranks)] = _group(ranks, new_group, key != ("pp",)) if new_group is not None else None
                if ranks == mine:
                    group = made[tuple(ranks)]
            size = len(mine)
            axes[key] = Axis("x".join(key), size, mine.index(rank), tuple(mine), group)
        return cls(plan, rank, axes)

    def axis(self, name: str) -> Axis:
        return self._axes[(name,)]

    def group(self, *names: str) -> Axis:
        """The group over several axes (must be one of COMBOS or a single axis)."""
        try:
            return self._axes[tuple(names)]
        except KeyError:
            raise KeyError(f"no process group over {names}; add it to launch.grid.COMBOS") from None

    def coords(self) -> dict[str, int]:
        return coords_of(self.plan, self.rank)

    def is_first_stage(self) -> bool:
        return self.axis("pp").coord == 0

    def is_last_stage(self) -> bool:
        return self.axis("pp").coord == self.plan.pp - 1


def _group(ranks: list[int], new_group: Any, may_be_world: bool) -> Any:
    """The process group of `ranks`: the default group when they are all the job's ranks and
    `may_be_world`, else a new one."""
    import torch.distributed as dist

    whole = may_be_world and dist.is_initialized() and len(ranks) == dist.get_world_size()
    return dist.group.WORLD if whole else new_group(ranks)
