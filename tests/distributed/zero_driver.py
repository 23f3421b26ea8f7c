"""A small training driver for the ZeRO / offload / recompute tests (a driver, not a test module;
its functions run on the ranks of a worker pool).

`make(plan)` builds a tiny model and its real gradient engine (`parallel.grad_engine.build`: ZeRO
for plan.zero > 0 or optimizer offload, else data parallelism); `train_step` is the trainer's
step on seeded random tokens (microbatches, loss / global tokens, summed gradients, global-norm
clip, AdamW). `make_fsdp2` puts PyTorch FSDP2 behind the same calls, the baseline of the ZeRO-3
peak-memory test.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from axon.init import materialize
from axon.model import build
from launch.grid import Grid
from parallel import grad_engine, recompute
from parallel.data_engine import adamw
from parallel.layout import complete
from perfmodel.specs import ModelSpec, Optim, Plan

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


def make(plan: Plan, spec: ModelSpec = SPEC) -> tuple[torch.nn.Module, Any, Grid]:
    """(model, its gradient engine for `plan`, grid) on this rank; no tensor parallelism."""
    grid = Grid.build(plan, dist.get_rank(), dist.get_world_size())
    model = build_model(plan, spec)
    named = dict(model.named_parameters())
    return model, grad_engine.build([model], named, complete({}, named), plan, grid, OPTIM), grid


def train_step(model: torch.nn.Module, engine: Any, grid: Grid, plan: Plan, step: int,
               spec: ModelSpec = SPEC, seq: int = SEQ, global_batch: int = BATCH, lr: float = LR) -> float:
    """One optimizer step; returns the step's loss (all-reduced: the same on every rank)."""
    dpc = grid.group("dp", "cp")
    local = batch(step, grid.axis("dp").coord, plan.dp, spec, seq, global_batch)
    micro = local.split(plan.micro_batch_size)
    engine.zero_grad()
    loss_sum = torch.zeros(())
    for i, mb in enumerate(micro):
        engine.set_last_backward(i == len(micro) - 1)
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


def train(plan: Plan, steps: int) -> list[float]:
    """Losses of `steps` steps on this rank (identical on every rank)."""
    model, engine, grid = make(plan)
    try:
        return [train_step(model, engine, grid, plan, s) for s in range(steps)]
    finally:
        engine.remove()


class FSDP2:
    """PyTorch FSDP2 (each Block `fully_shard`ed, then the root) behind the engine's calls, with
    summed gradients as ours (divide factor 1, SUM reductions) and the same torch AdamW."""

    def __init__(self, model: torch.nn.Module, grid: Grid):
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.fsdp import fully_shard

        mesh = DeviceMesh.from_group(grid.group("dp", "cp").group, "cpu")
        for block in model.layers.values():
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        for m in [*model.layers.values(), model]:  # sum, as we do (gloo has no PREMUL_SUM)
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)
        self.params = list(model.parameters())
        self.opt = adamw(dict(model.named_parameters()), OPTIM)

    def zero_grad(self) -> None:
        self.opt.zero_grad(set_to_none=True)

    def set_last_backward(self, last: bool) -> None:
        pass  # FSDP2 reduces every backward

    def finish(self) -> None:
        pass  # FSDP2 waits for its reduce-scatters at the end of backward

    def grad_norm(self, stage_group: Any = None) -> torch.Tensor:
        return torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None]).full_tensor()

    def clip(self, norm: torch.Tensor, max_norm: float) -> None:
        torch.nn.utils.clip_grads_with_norm_(self.params, max_norm, norm)

    def step(self, lr: float) -> None:
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.opt.step()

    def remove(self) -> None:
        pass

    def state_tensors(self) -> dict[str, list[torch.Tensor]]:
        """This rank's shards by role (the peak-memory benchmark's accounting)."""
        local = [p.to_local() for p in self.params]
        states = [v.to_local() if hasattr(v, "to_local") else v for st in self.opt.state.values() for v in st.values()]
        grads = [p.grad.to_local() for p in self.params if p.grad is not None]
        return {"params": local, "grads": grads, "optimizer": states, "host": []}


def make_fsdp2(plan: Plan, spec: ModelSpec = SPEC) -> tuple[torch.nn.Module, FSDP2, Grid]:
    grid = Grid.build(plan, dist.get_rank(), dist.get_world_size())
    model = build_model(plan, spec)
    return model, FSDP2(model, grid), grid
