"""Shared pieces of the pipeline benchmarks: a gloo process launcher and the model pieces.

Not a benchmark by itself; `pp_memory.py` and `pp_vs_torch.py` use it.
"""
from __future__ import annotations

import os
import socket
import tempfile
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from axon.init import materialize
from axon.model import GPT
from launch.grid import Grid
from parallel.pipeline import Pipeline, apply
from perfmodel.specs import ModelSpec, Offload, Plan


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, out_dir: str, fn: Callable, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=600))
    result = fn(*args)
    torch.save(result, os.path.join(out_dir, f"{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def spawn(world: int, fn: Callable, *args: Any) -> list[Any]:
    """Run `fn(*args)` on `world` gloo ranks (one CPU thread each); per-rank results."""
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_entry, args=(world, _free_port(), out, fn, args), nprocs=world, join=True)
        return [torch.load(os.path.join(out, f"{r}.pt"), weights_only=False) for r in range(world)]


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum")


def plan_for(pp: int, schedule: str, virtual_stages: int = 1, offload: float = 0.0, mbs: int = 1) -> Plan:
    v = 2 if schedule in ("zbv", "vhalf", "vmin") else virtual_stages
    return Plan(pp=pp, schedule=schedule, virtual_stages=v, micro_batch_size=mbs,
                offload=Offload(activations=offload))


def build_pipeline(spec: ModelSpec, plan: Plan, grid: Grid, seq: int, seed: int = 0) -> Pipeline:
    pipe = apply(spec, plan, grid, lambda ids, emb, head: GPT(spec, ids, emb, head), seq)
    for chunk in pipe.chunks.values():
        materialize(chunk, spec, seed, torch.device("cpu"))
    return pipe


def microbatches(spec: ModelSpec, m: int, mbs: int, seq: int, step: int) -> list:
    g = torch.Generator().manual_seed(step)
    data = torch.randint(0, spec.vocab_size, (m * mbs, seq + 1), generator=g)  # [m*mbs, S+1]
    positions = torch.arange(seq)
    return [(mb[:, :-1], mb[:, 1:], positions) for mb in data.split(mbs)]


class NoSync:
    """Stands in for DataParallel when there is no data parallelism to reduce over."""

    sync = True
