"""ZeRO shards presented to torch.distributed.checkpoint as DTensors (docs/architecture.md,
"Checkpoints").

A ZeRO unit splits its flat buffer over its group in equal flat ranges that cut through
parameters (parallel/zero_units.py); a DTensor shards rows in torch.chunk order. So a save first
exchanges each flat shard, with one all_to_all over the unit's group, into this rank's chunk of
rows of every parameter's local piece (a tensor-parallel block, or the whole tensor), and presents
each chunk as a DTensor of the full tensor on the mesh (tensor-parallel axes the parameter is not
reduced over, zero group), the piece's rows sharded once more over the zero dimension. A load
fills those chunks in place and `restore` sends them back into the flat shards. The cost is one
shard-sized copy of each saved tensor while a checkpoint is written or read; training memory and
collectives are unchanged.

    view = ZeroView(layout, group, mesh, layouts, device)  # per unit (its layout and ZeRO group)
    chunks = view.to_chunks(flat_shard)                 # [rows_k * cols] per slot
    state[name] = view.present(slot, chunk)             # a DTensor sharing `chunk`'s memory
    view.restore([local(state[name]) ...], flat_shard)  # after the load
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from launch.grid import Axis
from parallel.layout import ParamLayout
from parallel.layout_dtensor import TensorMesh
from parallel.zero_units import Layout, Slot


def chunk_range(rows: int, cols: int, d: int, k: int) -> tuple[int, int]:
    """Flat [a, b) of a [rows, cols] piece held by index k of d under torch.chunk (what a DTensor
    Shard(0) gives: ceil(rows / d) rows each, the last ones shorter or empty)."""
    size = math.ceil(rows / d) if rows else 0
    return min(k * size, rows) * cols, min((k + 1) * size, rows) * cols


def _block(slot: Slot) -> tuple[int, int]:
    """The slot's local piece as [rows, cols] (a 1-D piece is [n, 1])."""
    block = slot.place.block
    return (block[0], block[1]) if len(block) == 2 else (block[0], 1)


def _meet(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
    lo, hi = max(a[0], b[0]), min(a[1], b[1])
    return (lo, hi) if lo < hi else (lo, lo)


class ZeroView:
    """One unit's exchange between flat shards and per-parameter row chunks (see the module
    docstring). `mesh` and `layouts` give each parameter's DTensor placement."""

    def __init__(self, layout: Layout, group: Axis, mesh: TensorMesh, layouts: Mapping[str, ParamLayout],
                 device: torch.device):
        """`device`: where the group's collectives run (host-offloaded states travel through it)."""
        self.layout, self.group, self.mesh, self.layouts, self.device = layout, group, mesh, layouts, device
        d, me = layout.group_size, layout.coord
        self.chunks = [chunk_range(*_block(s), d, me) for s in layout.slots]  # my rows of each slot
        # for each peer k: per slot, the part of my flat range inside k's chunk (flat, slot coords),
        # and the part of k's flat range inside my chunk
        self.send = [[_meet(self._owned(s, me), chunk_range(*_block(s), d, k)) for s in layout.slots]
                     for k in range(d)]
        self.recv = [[_meet(self._owned(s, k), c) for s, c in zip(layout.slots, self.chunks)]
                     for k in range(d)]

    def _owned(self, slot: Slot, k: int) -> tuple[int, int]:
        """The slot's elements (slot coordinates) in index k's flat range."""
        lo, hi = self.layout.owned(k)
        return _meet((lo - slot.start, hi - slot.start), (0, slot.numel))

    def to_chunks(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """My row chunk of every slot ([rows_k * cols] each, new memory) from my flat shard."""
        lo = self.layout.owned()[0]
        base = [s.start - lo for s in self.layout.slots]  # slot element 0 in `flat`
        parts = [flat[o + a:o + b] for row in self.send for o, (a, b) in zip(base, row)]
        got = self._exchange(torch.cat(parts), self.send, self.recv)
        chunks = [torch.empty(b - a, dtype=flat.dtype, device=flat.device) for a, b in self.chunks]
        for k, row in enumerate(self.recv):
            for chunk, (c0, _), (a, b) in zip(chunks, self.chunks, row):
                if b > a:
                    chunk[a - c0:b - c0].copy_(next(got[k]))
        return chunks

    def restore(self, chunks: list[torch.Tensor], flat: torch.Tensor) -> None:
        """Write loaded row chunks (as `to_chunks` gave them) back into my flat shard."""
        parts = [c.reshape(-1)[a - c0:b - c0] for row in self.recv
                 for c, (c0, _), (a, b) in zip(chunks, self.chunks, row)]
        got = self._exchange(torch.cat(parts), self.recv, self.send)
        lo = self.layout.owned()[0]
        with torch.no_grad():
            for k, row in enumerate(self.send):
                for s, (a, b) in zip(self.layout.slots, row):
                    if b > a:
                        flat[s.start + a - lo:s.start + b - lo].copy_(next(got[k]))

    def _exchange(self, send: torch.Tensor, out_ranges: list, in_ranges: list) -> list[Any]:
        """all_to_all of `send` (peer-major, slot order: `out_ranges`) over the unit's group; per
        source peer, an iterator over its non-empty pieces in slot order (`in_ranges`)."""
        sizes_out = [sum(b - a for a, b in row) for row in out_ranges]
        sizes_in = [sum(b - a for a, b in row) for row in in_ranges]
        send = send.to(self.device)
        if self.layout.group_size == 1:
            recv = send
        else:
            recv = torch.empty(sum(sizes_in), dtype=send.dtype, device=self.device)
            dist.all_to_all_single(recv, send, sizes_in, sizes_out, group=self.group.group)
        pieces = recv.split(sizes_in)
        return [iter(p.split([b - a for a, b in row if b > a])) for p, row in zip(pieces, in_ranges)]

    def present(self, slot: Slot, chunk: torch.Tensor) -> torch.Tensor:
        """`chunk` (my rows of the slot's piece, flat) as a DTensor of the full tensor sharing its
        memory."""
        view = chunk.view(-1, _block(slot)[1]) if len(slot.place.block) == 2 else chunk  # [rows_k, cols] or [n_k]
        return self.mesh.to_zero_dtensor(self.layouts[slot.name], view)


def local(value: Any) -> torch.Tensor:
    """The local tensor of what `ZeroView.present` (or a plain state) holds after a load."""
    return value.to_local() if isinstance(value, DTensor) else value
