"""Worker functions of the tensor-parallel generation tests (tests/distributed/test_generate_tp.py):
each rank of the pool's world loads its shards and generates."""
from __future__ import annotations

import torch
import torch.distributed as dist

from axon.generate import Sampling, greedy, load_tensor_parallel, sample
from launch.grid import Grid
from perfmodel.specs import Plan


def tp_generate(sources: list[str], prompts: torch.Tensor, n_new: int,
                tp: tuple[int, int, int] | None = None) -> dict[str, torch.Tensor]:
    """On every rank: greedy tokens [N, n_new] per source under tensor parallelism `tp` (tp_col,
    tp_row, tp_depth; default tp_col = world size), and a sampled continuation under the source
    "sampled:<first source>" (temperature 1, seed 0)."""
    world = dist.get_world_size()
    col, row, depth = tp or (world, 1, 1)
    plan = Plan(tp_col=col, tp_row=row, tp_depth=depth)
    grid = Grid.build(plan, dist.get_rank(), world)
    out = {}
    for source in sources:
        model = load_tensor_parallel(source, plan, grid, torch.device("cpu"))
        out[source] = greedy(model, prompts, n_new)
    out[f"sampled:{sources[0]}"] = sample(model, prompts, n_new, Sampling(temperature=1.0),
                                          torch.Generator().manual_seed(0))
    return out
