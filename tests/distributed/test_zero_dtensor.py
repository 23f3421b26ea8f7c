"""ZeRO shards as DTensors (parallel/zero_dtensor.py): a unit's flat ranges, which cut through
parameters, are exchanged into torch.chunk row chunks of each parameter (uneven and empty chunks
included), restored exactly, and a checkpoint written by 4 ranks loads into 3 (other flat ranges,
other chunks) through the real save and load (axon/checkpoint.py)."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from axon import checkpoint as ckpt
from launch.grid import Grid
from parallel.layout import replicated
from parallel.layout_dtensor import TensorMesh
from parallel.zero_dtensor import ZeroView, local
from parallel.zero_units import Layout, whole_place
from perfmodel.specs import Plan

# rows 3 and 2 over 4 ranks: chunks of 1 row, the last one or two empty; 7 rows: 2, 2, 2, 1
SHAPES = {"a": (3, 5), "b": (2,), "c": (7, 4), "d": (6,)}


def _full(name: str) -> torch.Tensor:
    """The parameter's value: distinct per element and per parameter."""
    n = torch.Size(SHAPES[name]).numel()
    return (torch.arange(n, dtype=torch.float32) + 1000 * (ord(name) - ord("a"))).view(SHAPES[name])


def _view(zero: bool = True) -> tuple[ZeroView, torch.Tensor]:
    """This rank's ZeroView of one unit holding SHAPES over dp = world size, and its flat shard."""
    world, rank = dist.get_world_size(), dist.get_rank()
    grid = Grid.build(Plan(dp=world), rank, world)
    named = [(n, nn.Parameter(torch.zeros(s)), whole_place(s)) for n, s in SHAPES.items()]
    layout = Layout(named, world, rank)
    flat = torch.zeros(layout.padded)
    for s in layout.slots:
        flat[s.start:s.stop] = _full(s.name).reshape(-1)
    lo, hi = layout.owned()
    layouts = {n: replicated(s) for n, s in SHAPES.items()}
    return ZeroView(layout, grid.group("dp", "cp"), TensorMesh(grid), layouts, torch.device("cpu")), flat[lo:hi].clone()


def _real(view: ZeroView) -> int:
    """How many elements of my shard are parameters (the rest is the unit's padding)."""
    lo, hi = view.layout.owned()
    return max(0, min(view.layout.numel, hi) - lo)


def exchange_and_save(root: str) -> list[tuple[str, list[int], list[int]]]:
    view, shard = _view()
    rank, world = dist.get_rank(), dist.get_world_size()
    chunks = view.to_chunks(shard)
    for s, chunk in zip(view.layout.slots, chunks):
        rows = _full(s.name).chunk(world)  # torch.chunk: what a DTensor Shard(0) holds
        want = rows[rank] if rank < len(rows) else _full(s.name)[:0]
        assert torch.equal(chunk.view(want.shape), want), (s.name, chunk, want)
    back = torch.zeros_like(shard)
    view.restore(chunks, back)
    assert torch.equal(back[:_real(view)], shard[:_real(view)])
    state = {s.name: view.present(s, c) for s, c in zip(view.layout.slots, chunks)}
    out = []
    for name, t in state.items():
        assert isinstance(t, DTensor) and t.shape == torch.Size(SHAPES[name])
        (meta,) = t.__create_chunk_list__()
        out.append((name, list(meta.offsets), list(meta.sizes)))
    ckpt.save(Path(root), 1, state, {}, {"step": 1}, keep=0, run_id="zero-dtensor")
    return out


def load_restore(path: str) -> bool:
    view, shard = _view()
    state = {s.name: view.present(s, torch.zeros_like(c))
             for s, c in zip(view.layout.slots, view.to_chunks(torch.zeros_like(shard)))}
    ckpt.load(Path(path), state, {})
    got = torch.full_like(shard, -1.0)
    view.restore([local(state[s.name]) for s in view.layout.slots], got)
    return torch.equal(got[:_real(view)], shard[:_real(view)])


def test_flat_ranges_become_row_chunks_and_reshard(tmp_path, dist_pools):
    per_rank = dist_pools.run(4, exchange_and_save, str(tmp_path))
    for name, shape in SHAPES.items():  # the ranks' chunks tile each parameter once, in torch.chunk order
        metas = sorted((offsets, sizes) for rank in per_rank for n, offsets, sizes in rank if n == name)
        rows = [sizes[0] for _, sizes in metas]
        assert sum(rows) == shape[0] and [o[0] for o, _ in metas] == [sum(rows[:i]) for i in range(len(rows))]
    assert any(sizes[0] == 0 for rank in per_rank for _, _, sizes in rank)  # empty chunks were exercised
    path = ckpt.complete_checkpoints(tmp_path)[-1]
    assert all(dist_pools.run(3, load_restore, str(path)))
    assert all(dist_pools.run(4, load_restore, str(path)))
