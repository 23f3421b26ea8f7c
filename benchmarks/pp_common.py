"""Shared pieces of the pipeline benchmarks: the model pieces (ranks start with launch.local.spawn).

Not a benchmark by itself; `pp_memory.py`, `pp_vs_torch.py` and `e2e_peers/pipelining.py` use it.
"""
from __future__ import annotations

import torch
from torch import nn

from axon.init import materialize
from axon.model import GPT
from launch.grid import Grid
from parallel.head_loss import cross_entropy_sum, of_logits
from parallel.pipeline import Pipeline, apply
from perfmodel.specs import ModelSpec, Offload, Plan


loss_fn = cross_entropy_sum  # on logits: torch.distributed.pipelining's loss
head_loss = of_logits(cross_entropy_sum)  # the same objective through our executor (unfused, as the peer)


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


class Stage(nn.Module):
    """A chunk as torch.distributed.pipelining wants it: forward(x) -> activation (or logits)."""

    def __init__(self, chunk: nn.Module, first: bool, last: bool, seq: int):
        super().__init__()
        self.chunk, self.first, self.last = chunk, first, last
        self.register_buffer("positions", torch.arange(seq), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.first:
            x = self.chunk.embed(x, self.positions)  # [b, S] -> [b, S, h]
        x = self.chunk.blocks(x, self.positions)
        return self.chunk.logits(x) if self.last else x  # [b, S, V] or [b, S, h]
