"""A small training-step driver for the tensor-parallel tests (run on every rank of a pool).

`parity(cases)` runs, for each (plan fields, model fields) case, one step of two microbatches
on the 3D tensor-parallel model and on a single-process reference of the same model, seed and
data, sums gradients over each parameter's declared `grad_axes` (what the data-parallel wrapper
does), and returns per case the loss and the relative error of loss and of every gradient.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from axon.init import materialize
from axon.model import build
from launch.grid import Grid
from parallel.tensor import apply
from perfmodel.specs import ModelSpec, Plan

SEED, SEQ, MICRO = 3, 16, 2


def batch(spec: ModelSpec, plan: Plan) -> torch.Tensor:
    """The global batch [shards * MICRO, SEQ + 1], the same on every rank."""
    g = torch.Generator().manual_seed(11)
    return torch.randint(0, spec.vocab_size, (plan.data_shards * MICRO, SEQ + 1), generator=g)


def reference(spec: ModelSpec, tokens: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    model = build(spec)
    materialize(model, spec, SEED, torch.device("cpu"))
    logits = model(tokens[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(), reduction="sum") / tokens[:, 1:].numel()
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters()}


def local_slice(full: torch.Tensor, shard) -> torch.Tensor:
    t = full.reshape(full.shape[0], -1) if full.dim() > 1 else full.reshape(-1, 1)
    t = t[shard.rows, shard.cols]
    return t.reshape(-1)[shard.flat] if shard.flat is not None else t


def tp_step(spec: ModelSpec, plan: Plan, grid: Grid, tokens: torch.Tensor):
    """One step of MICRO microbatches (one sample each) on this rank's data shard."""
    model = build(spec)
    tp = apply(model, spec, plan, grid)
    materialize(model, spec, SEED, torch.device("cpu"), shards=tp.shards, full_shapes=tp.full_shapes)
    c = grid.coords()
    shard = c["dp"] * plan.tp_depth + c["tp_depth"]
    mine = tokens[shard * MICRO:(shard + 1) * MICRO]
    n_tokens = tokens[:, 1:].numel()
    loss_sum = torch.zeros(())
    for i in range(MICRO):
        sample = mine[i:i + 1]
        loss = tp.loss_fn(model(sample[:, :-1]), sample[:, 1:])
        (loss / n_tokens).backward()
        loss_sum += loss.detach()
    dist.all_reduce(loss_sum, group=grid.group("dp", "cp", "tp_depth").group)
    for name, p in model.named_parameters():
        dist.all_reduce(p.grad, group=grid.group(*tp.grad_axes[name]).group)
    return model, tp, loss_sum.item() / n_tokens


def parity(cases: list[tuple[dict, dict]]) -> list[dict]:
    out = []
    for plan_kw, spec_kw in cases:
        spec = ModelSpec(**spec_kw)
        plan = Plan(**plan_kw)
        grid = Grid.build(plan, dist.get_rank(), dist.get_world_size())
        tokens = batch(spec, plan)
        ref_loss, ref_grads = reference(spec, tokens)
        model, tp, loss = tp_step(spec, plan, grid, tokens)
        errs = {}
        for name, p in model.named_parameters():
            want = local_slice(ref_grads[name], tp.shards[name]).reshape(p.shape)
            errs[name] = ((p.grad - want).norm() / want.norm().clamp_min(1e-30)).item()
        out.append({"loss": loss, "ref_loss": ref_loss, "grad_err": errs})
    return out
