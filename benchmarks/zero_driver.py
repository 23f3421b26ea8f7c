"""A small training driver for the ZeRO / offload / recompute tests and benchmarks: the trainer's
step (microbatches, loss / global tokens, summed gradients, global-norm clip, AdamW) on a tiny
model and seeded random tokens, run either through `parallel.zero` or through the plain path the
trainer uses today (`DataParallel` + `torch.optim.AdamW`)."""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from axon.config import Optim
from axon.init import materialize
from axon.model import build
from axon.optim import build_optimizer, clip_, global_grad_norm
from launch.grid import Grid
from parallel import recompute, zero
from parallel.data import DataParallel
from perfmodel.specs import ModelSpec, Plan

SPEC = ModelSpec(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, vocab_size=64, max_seq_len=16)
OPTIM = Optim(name="adamw", beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, grad_clip=1.0, warmup_steps=2,
              min_lr_ratio=0.1)
SEQ, BATCH, LR = 16, 8, 1e-2


def batch(step: int, shard: int, shards: int, spec: ModelSpec = SPEC, seq: int = SEQ,
          global_batch: int = BATCH) -> torch.Tensor:
    """This shard's rows of the step's global batch: [global_batch / shards, seq + 1] tokens, each
    row counting up by a seeded random stride from a seeded random start (learnable in a few steps)."""
    g = torch.Generator().manual_seed(1000 + step)
    start = torch.randint(0, spec.vocab_size, (global_batch, 1), generator=g)
    stride = torch.randint(1, 3, (global_batch, 1), generator=g)
    data = (start + stride * torch.arange(seq + 1)) % spec.vocab_size  # [global_batch, seq + 1]
    per = global_batch // shards
    return data[shard * per:(shard + 1) * per]


def build_model(plan: Plan, spec: ModelSpec = SPEC) -> torch.nn.Module:
    model = build(spec)
    recompute.apply(model, plan)
    materialize(model, spec, 0, torch.device("cpu"))
    return model


class Plain:
    """The trainer's current path, behind the engine's interface."""

    def __init__(self, model: torch.nn.Module, grid: Grid, plan: Plan):
        dpc = grid.group("dp", "cp")
        self.named = dict(model.named_parameters())
        self.params = list(self.named.values())
        self.dp = DataParallel([(self.params, dpc.group, dpc.size)], bucket_mb=plan.bucket_mb)
        self.opt = build_optimizer(model, OPTIM, LR)

    @property
    def sync(self) -> bool:
        return self.dp.sync

    @sync.setter
    def sync(self, value: bool) -> None:
        self.dp.sync = value

    def zero_grad(self) -> None:
        self.dp.zero_grad()

    def finish(self) -> None:
        self.dp.finish()

    def grad_norm(self, stage_group: Any = None) -> torch.Tensor:
        return global_grad_norm(self.named, {n: 1.0 for n in self.named}, None, stage_group)

    def clip(self, norm: torch.Tensor, max_norm: float) -> None:
        clip_(self.params, norm, max_norm)

    def step(self, lr: float) -> None:
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.opt.step()

    def remove(self) -> None:
        self.dp.remove()


def make(plan: Plan, use_engine: bool, spec: ModelSpec = SPEC) -> tuple[torch.nn.Module, Any, Grid]:
    grid = Grid.build(plan, dist.get_rank(), dist.get_world_size())
    model = build_model(plan, spec)
    engine = zero.apply(model, plan, grid, OPTIM) if use_engine else Plain(model, grid, plan)
    return model, engine, grid


def train_step(model: torch.nn.Module, engine: Any, grid: Grid, plan: Plan, step: int,
               spec: ModelSpec = SPEC, seq: int = SEQ, global_batch: int = BATCH, lr: float = LR) -> float:
    dpc = grid.group("dp", "cp")
    local = batch(step, grid.axis("dp").coord, plan.dp, spec, seq, global_batch)
    micro = local.split(plan.micro_batch_size)
    engine.zero_grad()
    loss_sum = torch.zeros(())
    for i, mb in enumerate(micro):
        engine.sync = i == len(micro) - 1
        logits = model(mb[:, :-1])  # [mbs, S, V]
        loss = F.cross_entropy(logits.flatten(0, 1), mb[:, 1:].flatten(), reduction="sum")
        (loss / (global_batch * seq)).backward()
        loss_sum += loss.detach()
    engine.finish()
    engine.clip(engine.grad_norm(), OPTIM.grad_clip)
    engine.step(lr)
    if dpc.size > 1:
        dist.all_reduce(loss_sum, group=dpc.group)
    return (loss_sum / (global_batch * seq)).item()


def train(plan: Plan, use_engine: bool, steps: int) -> list[float]:
    """Losses of `steps` steps on this rank (identical on every rank)."""
    model, engine, grid = make(plan, use_engine)
    try:
        return [train_step(model, engine, grid, plan, s) for s in range(steps)]
    finally:
        engine.remove()
