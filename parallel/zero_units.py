"""Flat parameter units for ZeRO: the layout of a group of parameters in one flat buffer, the
slice of it each rank of the unit's ZeRO group owns, and where each parameter's piece sits in the
full tensor.

A unit (one transformer Block's parameters that share a gradient-reduction group, or a chunk's
other parameters) lays its parameters end to end in a flat buffer padded to a multiple of the
group size d; rank r owns elements [r * n/d, (r+1) * n/d). Ownership cuts through parameters, so
a rank holds, per parameter, a contiguous 1-D range of the flattened tensor (possibly empty).
Under tensor parallelism the parameters are the rank's local pieces and the ZeRO group is the
group their gradient is summed over (ranks holding the same piece), so ZeRO shards the piece.

Checkpoints: a parameter's local piece is a 1-D or 2-D block of the full tensor (`Place`: a
tensor-parallel [rows, cols] piece, a depth slice being a row block of it, or the whole tensor);
parallel/zero_dtensor.py exchanges the flat ranges into row chunks of that block for DCP.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from launch.grid import Grid
from parallel.attach import blocks as chunk_blocks
from parallel.layout import ParamLayout, decays


@dataclass(frozen=True)
class Place:
    """Where a rank's piece of a parameter sits in the full tensor (shape `full`): the piece as a
    1-D/2-D `block` of it."""

    full: tuple[int, ...]
    block: tuple[int, ...]


def whole_place(shape: tuple[int, ...]) -> Place:
    """A parameter that is not tensor-parallel: the piece is the whole tensor."""
    return Place(tuple(shape), tuple(shape))


def tp_place(layout: ParamLayout, grid: Grid) -> Place:
    """A tensor-parallel piece: the rows of the full tensor's 2-D view split over `split[0]`, the
    columns over `split[1]`, and with `depth_flat` the piece's rows again over tp_depth (a depth
    slice is a row block of the piece: the model divides so)."""
    plan, full = grid.plan, layout.full_shape

    def n(axis: str | None) -> int:
        return getattr(plan, axis) if axis else 1

    row_axis, col_axis = layout.split
    z = plan.tp_depth if layout.depth_flat else 1
    rows, cols = full[0] // n(row_axis) // z, math.prod(full[1:]) // n(col_axis)
    return Place(tuple(full), (rows, cols)[:len(full)])


def split_blocks(model: nn.Module) -> tuple[list[tuple[str, nn.Module, list]], list[tuple[str, nn.Parameter]]]:
    """Blocks (`layers.<i>`, in execution order) with their named parameters, and the rest."""
    blocks = []
    in_block: set[int] = set()
    for key, block in chunk_blocks(model):
        named = [(f"layers.{key}.{n}", p) for n, p in block.named_parameters() if p.requires_grad]
        blocks.append((f"layers.{key}", block, named))
        in_block.update(id(p) for _, p in named)
    root = [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in in_block]
    return blocks, root


@dataclass(frozen=True)
class Slot:
    """One parameter's place in its unit's flat buffer."""

    name: str
    param: nn.Parameter
    shape: tuple[int, ...]  # the local tensor's shape
    start: int  # offset in the flat buffer
    numel: int
    place: Place

    @property
    def stop(self) -> int:
        return self.start + self.numel

    @property
    def decay(self) -> bool:
        """Whether AdamW weight decay applies (parallel.layout.decays, by the full shape)."""
        return decays(self.place.full)


class Layout:
    """Where each parameter of a unit sits in the flat buffer and which slice rank `coord` owns."""

    def __init__(self, named: list[tuple[str, nn.Parameter, Place]], group_size: int, coord: int):
        self.slots: list[Slot] = []
        offset = 0
        for name, p, place in named:
            if len(place.full) > 2:
                raise ValueError(f"ZeRO units hold 1-D and 2-D parameters; {name} has shape {place.full}")
            self.slots.append(Slot(name, p, tuple(p.shape), offset, p.numel(), place))
            offset += p.numel()
        self.numel = offset
        self.group_size = group_size
        self.padded = math.ceil(offset / group_size) * group_size
        self.shard_numel = self.padded // group_size
        self.coord = coord

    def owned(self, coord: int | None = None) -> tuple[int, int]:
        """[lo, hi) of the flat buffer owned by data-parallel index `coord` (default: mine)."""
        c = self.coord if coord is None else coord
        return c * self.shard_numel, (c + 1) * self.shard_numel

    def pieces(self, coord: int | None = None) -> list[tuple[Slot, int, int]]:
        """(slot, a, b): elements [a, b) of the flattened parameter inside `coord`'s slice."""
        lo, hi = self.owned(coord)
        out = []
        for s in self.slots:
            a, b = max(lo, s.start), min(hi, s.stop)
            if a < b:
                out.append((s, a - s.start, b - s.start))
        return out

    def decay_ranges(self) -> list[tuple[int, int]]:
        """[a, b) ranges of my shard (shard coordinates) that take weight decay."""
        lo = self.owned()[0]
        return [(s.start + a - lo, s.start + b - lo) for s, a, b in self.pieces() if s.decay]
