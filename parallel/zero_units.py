"""Flat parameter units for ZeRO: the layout of a group of parameters in one flat buffer, the
slice of it each data-parallel rank owns, and how an owned slice is shown to checkpoints.

A unit (one transformer Block, or the model's other parameters) lays its parameters end to end
in a flat buffer padded to a multiple of the group size d; rank r owns elements
[r * n/d, (r+1) * n/d). Ownership cuts through parameters, so a rank holds, per parameter, a
contiguous 1-D range of the flattened tensor (possibly empty).

Checkpoints: such a range of a 1-D or 2-D parameter is at most three row-aligned boxes of the
full tensor (a partial first row, whole middle rows, a partial last row). Each box is a view of
the flat buffer, presented to torch.distributed.checkpoint as one shard of a `ShardedTensor` of
the parameter's full shape whose global metadata lists every rank's boxes (computed locally:
the layout is a pure function of the unit and d). DCP matches boxes by overlap, so a checkpoint
saved by any d (or by a plain, unsharded run) loads into any other, and loading writes straight
into the flat buffers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
from torch.distributed._shard.sharded_tensor.metadata import ShardedTensorMetadata, TensorProperties


@dataclass(frozen=True)
class Slot:
    """One parameter's place in its unit's flat buffer."""

    name: str
    param: nn.Parameter
    shape: tuple[int, ...]
    start: int  # offset in the flat buffer
    numel: int
    decay: bool  # AdamW weight decay applies (matrices yes, vectors no)

    @property
    def stop(self) -> int:
        return self.start + self.numel


class Layout:
    """Where each parameter of a unit sits in the flat buffer and which slice rank `coord` owns."""

    def __init__(self, named: list[tuple[str, nn.Parameter]], group_size: int, coord: int):
        self.slots: list[Slot] = []
        offset = 0
        for name, p in named:
            if p.dim() > 2:
                raise ValueError(f"ZeRO units hold 1-D and 2-D parameters; {name} has shape {tuple(p.shape)}")
            self.slots.append(Slot(name, p, tuple(p.shape), offset, p.numel(), p.dim() >= 2))
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


def sharded_view(layout: Layout, slot: Slot, flat_shard: torch.Tensor, ranks: tuple[int, ...]) -> ShardedTensor:
    """`slot`'s part of my shard (`flat_shard` = [shard_numel], in the layout's shard coordinates)
    as a ShardedTensor of the parameter's full shape; `ranks[c]` is the global rank of index c.
    Every element is owned by some index, so the global metadata covers the whole tensor."""
    lo = layout.owned()[0]
    device = flat_shard.device
    dev = "cpu" if device.type == "cpu" else f"{device.type}:{device.index or 0}"
    every, local = [], []
    for c, rank in enumerate(ranks):
        for s, a, b in layout.pieces(c):
            if s is not slot:
                continue
            for offsets, sizes, fa, fb in boxes(a, b, slot.shape):
                md = ShardMetadata(shard_offsets=offsets, shard_sizes=sizes, placement=f"rank:{rank}/{dev}")
                every.append(md)
                if c == layout.coord:
                    start = slot.start + fa - lo
                    local.append(Shard(flat_shard[start:start + fb - fa].view(sizes), md))
    props = TensorProperties(dtype=flat_shard.dtype)
    meta = ShardedTensorMetadata(every, torch.Size(slot.shape), props)
    return ShardedTensor._init_from_local_shards_and_global_metadata(local, meta)
