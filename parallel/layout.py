"""`ParamLayout`: how one parameter is laid out over the process grid, the one record every
mechanism that touches parameters reads (docs/architecture.md, "Parameter layouts").

    layouts = merge(tp.layouts, ...)          # each apply_* returns the layouts of what it shards
    layout = layouts.get(name) or replicated(shape)

A layout says which slice of the full tensor this rank holds (`shard`, read by materialization
and checkpoints), which grid axes split that full tensor's 2-D view (`split`, and `depth_flat`
when the piece is flattened and split again over tp_depth), and the grid axes its gradient is
summed over (`grad_axes`, read by data parallelism and ZeRO). How many distinct pieces and how
many copies of each exist follow from these and the plan, so they are computed, never stored.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Optional

from parallel.shard import Shard
from perfmodel.specs import Plan

DATA_AXES = ("dp", "cp")  # a parameter that no mechanism shards: gradient summed over data and context
TP_AXES = ("tp_col", "tp_row", "tp_depth")  # the tensor-parallel grid axes, in mesh order


@dataclass(frozen=True)
class ParamLayout:
    """One parameter's layout (see the module docstring). The 2-D view of a tensor of shape
    [d0, d1, ...] is [d0, d1 * ...]; `split` names the axes over which its rows and its columns
    are split (None = whole)."""

    full_shape: tuple[int, ...]
    shard: Shard = field(default_factory=Shard)
    split: tuple[Optional[str], Optional[str]] = (None, None)
    depth_flat: bool = False  # the [rows, cols] piece is flattened and split again over tp_depth
    grad_axes: tuple[str, ...] = DATA_AXES

    def __post_init__(self) -> None:
        if self.depth_flat != (self.shard.flat is not None):
            raise ValueError(f"a depth-flattened layout needs a flat shard slice and only it has one: {self}")

    @property
    def sharded(self) -> bool:
        """Whether any rank holds less than the whole tensor."""
        return self.split != (None, None) or self.depth_flat

    def pieces(self, plan: Plan) -> int:
        """How many distinct pieces the tensor-parallel group holds."""
        n = math.prod(getattr(plan, axis) for axis in self.split if axis)
        return n * (plan.tp_depth if self.depth_flat else 1)

    def copies(self, plan: Plan) -> int:
        """How many ranks of the tensor-parallel group hold each piece (the gradient norm weighs
        each element by 1 / copies, so that a sum over the group counts it once)."""
        return plan.tp // self.pieces(plan)



def decays(full_shape: tuple[int, ...]) -> bool:
    """AdamW weight decay applies to matrices, judged by the full tensor's shape (a tp_depth slice
    of a matrix is flat locally but still decays); vectors (norms, biases) do not decay."""
    return len(full_shape) >= 2


def replicated(shape: Iterable[int]) -> ParamLayout:
    """The layout of a parameter no mechanism shards."""
    return ParamLayout(tuple(shape))


def merge(*parts: Mapping[str, ParamLayout]) -> dict[str, ParamLayout]:
    """One mapping from the layouts each mechanism returned; a parameter claimed twice is a bug."""
    out: dict[str, ParamLayout] = {}
    for part in parts:
        for name, layout in part.items():
            if name in out:
                raise ValueError(f"parameter {name} is laid out by two mechanisms")
            out[name] = layout
    return out


def complete(layouts: Mapping[str, ParamLayout], named: Mapping[str, object]) -> dict[str, ParamLayout]:
    """`layouts` extended with the replicated layout of every parameter in `named` (name ->
    parameter with a `.shape`) that no mechanism claimed."""
    return {name: layouts.get(name) or replicated(p.shape) for name, p in named.items()}  # type: ignore[attr-defined]
