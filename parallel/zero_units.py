"""Flat parameter units for ZeRO: the layout of a group of parameters in one flat buffer, the
slice of it each rank of the unit's ZeRO group owns, and how an owned slice is shown to checkpoints.

A unit (one transformer Block's parameters that share a gradient-reduction group, or a chunk's
other parameters) lays its parameters end to end in a flat buffer padded to a multiple of the
group size d; rank r owns elements [r * n/d, (r+1) * n/d). Ownership cuts through parameters, so
a rank holds, per parameter, a contiguous 1-D range of the flattened tensor (possibly empty).
Under tensor parallelism the parameters are the rank's local pieces and the ZeRO group is the
group their gradient is summed over (ranks holding the same piece), so ZeRO shards the piece.

Checkpoints: a parameter's local piece is a 1-D or 2-D block of the full tensor (`Place`: a
tensor-parallel [rows, cols] piece, a depth slice being a row block of it, or the whole
tensor). A range of the flattened block is at most three row-aligned boxes (a partial first row,
whole middle rows, a partial last row); each box is a view of the flat buffer, presented to
torch.distributed.checkpoint as one shard of a `ShardedTensor` of the parameter's full shape
whose global metadata lists every distinct piece's boxes (computed locally: the layout is a pure
function of the unit and d, and every tensor-parallel piece has the same shape). DCP matches
boxes by overlap (replicas of a box are saved once), so a checkpoint saved by any layout (or by
a plain, unsharded run) loads into any other, and loading writes straight into the flat buffers.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
from torch.distributed._shard.sharded_tensor.metadata import ShardedTensorMetadata, TensorProperties

from launch.grid import Grid, group_ranks, rank_of
from parallel.attach import blocks as chunk_blocks
from parallel.layout import ParamLayout, decays

Origin = tuple[int, ...]


@dataclass(frozen=True)
class Place:
    """Where a rank's piece of a parameter sits in the full tensor (shape `full`): the piece as a
    1-D/2-D `block` of it, every distinct piece as (origin, global ranks of its ZeRO group), and
    the origin of mine."""

    full: tuple[int, ...]
    block: tuple[int, ...]
    pieces: tuple[tuple[Origin, tuple[int, ...]], ...]
    mine: Origin


def whole_place(shape: tuple[int, ...], ranks: tuple[int, ...]) -> Place:
    """A parameter that is not tensor-parallel: the piece is the whole tensor."""
    zero = (0,) * len(shape)
    return Place(tuple(shape), tuple(shape), ((zero, tuple(ranks)),), zero)


def tp_place(layout: ParamLayout, grid: Grid) -> Place:
    """A tensor-parallel piece: the rows of the full tensor's 2-D view split over `split[0]`, the
    columns over `split[1]`, and with `depth_flat` the piece's rows again over tp_depth (a depth
    slice is a row block of the piece: the model divides so); the ZeRO group of each piece is the
    group its gradient is summed over (`grad_axes`)."""
    plan, full, axes, flat = grid.plan, layout.full_shape, tuple(layout.grad_axes), layout.depth_flat

    def n(axis: str | None) -> int:
        return getattr(plan, axis) if axis else 1

    row_axis, col_axis = layout.split
    z = plan.tp_depth if flat else 1
    rows, cols = full[0] // n(row_axis) // z, math.prod(full[1:]) // n(col_axis)
    me = grid.coords()
    pieces, mine = [], None
    for i, k, j in itertools.product(range(n(row_axis)), range(z), range(n(col_axis))):
        coords = dict(me)
        coords.update({a: c for a, c in ((row_axis, i), ("tp_depth" if flat else None, k), (col_axis, j)) if a})
        origin = ((i * z + k) * rows, j * cols)[:len(full)]
        pieces.append((origin, tuple(group_ranks(plan, rank_of(plan, coords), axes))))
        if coords == me:
            mine = origin
    return Place(tuple(full), (rows, cols)[:len(full)], tuple(pieces), mine)


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


def boxes(a: int, b: int, shape: tuple[int, ...]) -> list[tuple[list[int], list[int], int, int]]:
    """Elements [a, b) of a flattened 1-D/2-D tensor as row-aligned boxes:
    (offsets, sizes, flat start, flat stop)."""
    if len(shape) == 1:
        return [([a], [b - a], a, b)]
    cols = shape[1]
    out = []
    i = a
    while i < b:
        row, col = divmod(i, cols)
        if col or b - i < cols:  # a partial row
            n = min(cols - col, b - i)
            out.append(([row, col], [1, n], i, i + n))
            i += n
        else:  # whole rows
            rows = (b - i) // cols
            out.append(([row, 0], [rows, cols], i, i + rows * cols))
            i += rows * cols
    return out


def sharded_view(layout: Layout, slot: Slot, flat: torch.Tensor, whole: bool = False) -> ShardedTensor:
    """`slot`'s part of `flat` as a ShardedTensor of the parameter's full shape. `flat` is my shard
    ([shard_numel], the layout's shard coordinates) or, with `whole`, a buffer holding the unit's
    every element ([padded]: ZeRO 1-2 parameters). Every element of every distinct piece is owned
    by some index of its group, so the global metadata tiles the whole tensor once."""
    place = slot.place
    spans = [[(0, slot.numel)]] if whole else [[(a, b) for s, a, b in layout.pieces(c) if s is slot]
                                               for c in range(layout.group_size)]
    mine = 0 if whole else layout.coord
    base = slot.start - (0 if whole else layout.owned()[0])  # flat index of the slot's element 0
    device = flat.device
    dev = "cpu" if device.type == "cpu" else f"{device.type}:{device.index or 0}"
    every, local = [], []
    for origin, ranks in place.pieces:
        for c, owned in enumerate(spans):
            for a, b in owned:
                for offsets, sizes, fa, fb in boxes(a, b, place.block):
                    at = [o + x for o, x in zip(offsets, origin)]
                    md = ShardMetadata(shard_offsets=at, shard_sizes=sizes, placement=f"rank:{ranks[c]}/{dev}")
                    every.append(md)
                    if c == mine and origin == place.mine:
                        local.append(Shard(flat[base + fa:base + fb].view(sizes), md))
    props = TensorProperties(dtype=flat.dtype)
    meta = ShardedTensorMetadata(every, torch.Size(place.full), props)
    return ShardedTensor._init_from_local_shards_and_global_metadata(local, meta)
