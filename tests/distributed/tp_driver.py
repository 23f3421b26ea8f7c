"""A small training-step driver for the tensor-parallel tests (run on every rank of a pool).

`parity(cases, steps)` runs, for each (plan fields, model fields) case, `steps` steps of two
microbatches (an SGD update between steps) on the 3D tensor-parallel model and on a
single-process reference of the same model, seed and data, sums gradients over each
parameter's declared `grad_axes` (what the data-parallel wrapper does), and returns per case
the losses, the worst relative error of every gradient over the steps, and the bytes counted.
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


def batch(spec: ModelSpec, plan: Plan, step: int) -> torch.Tensor:
    """The global batch of `step` [shards * MICRO, SEQ + 1], the same on every rank."""
    g = torch.Generator().manual_seed(11 + step)
    return torch.randint(0, spec.vocab_size, (plan.data_shards * MICRO, SEQ + 1), generator=g)


LR = 0.5


def build_reference(spec: ModelSpec) -> torch.nn.Module:
    model = build(spec)
    materialize(model, spec, SEED, torch.device("cpu"))
    return model


def reference_step(model: torch.nn.Module, tokens: torch.Tensor) -> float:
    logits = model(tokens[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(), reduction="sum") / tokens[:, 1:].numel()
    loss.backward()
    return loss.item()


def sgd(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p -= LR * p.grad
            p.grad = None


def local_slice(full: torch.Tensor, shard) -> torch.Tensor:
    t = full.reshape(full.shape[0], -1) if full.dim() > 1 else full.reshape(-1, 1)
    t = t[shard.rows, shard.cols]
    return t.reshape(-1)[shard.flat] if shard.flat is not None else t


def build_tp(spec: ModelSpec, plan: Plan, grid: Grid):
    model = build(spec)
    tp = apply(model, spec, plan, grid)
    materialize(model, spec, SEED, torch.device("cpu"), tp.layouts)
    return model, tp


def tp_step(model, tp, plan: Plan, grid: Grid, tokens: torch.Tensor) -> float:
    """One step of MICRO microbatches (one sample each) on this rank's data shard."""
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
        dist.all_reduce(p.grad, group=grid.group(*tp.layouts[name].grad_axes).group)
    return loss_sum.item() / n_tokens


def parity(cases: list[tuple[dict, dict]], steps: int = 1) -> list[dict]:
    out = []
    for plan_kw, spec_kw in cases:
        spec = ModelSpec(**spec_kw)
        plan = Plan(**plan_kw)
        grid = Grid.build(plan, dist.get_rank(), dist.get_world_size())
        ref = build_reference(spec)
        model, tp = build_tp(spec, plan, grid)
        res = {"loss": [], "ref_loss": [], "grad_err": {}, "bytes": []}
        for step in range(steps):
            tokens = batch(spec, plan, step)
            res["ref_loss"].append(reference_step(ref, tokens))
            tp.comm.reset()
            res["loss"].append(tp_step(model, tp, plan, grid, tokens))
            res["bytes"].append(tp.comm.reset())
            ref_grads = dict((n, p.grad) for n, p in ref.named_parameters())
            for name, p in model.named_parameters():
                want = local_slice(ref_grads[name], tp.layouts[name].shard).reshape(p.shape)
                # relative error; a gradient that is zero in exact arithmetic (the key bias with
                # learned positions: softmax ignores a per-query constant) is compared absolutely
                err = ((p.grad - want).norm() / want.norm().clamp_min(1e-3)).item()
                res["grad_err"][name] = max(err, res["grad_err"].get(name, 0.0))
            sgd(ref)
            sgd(model)
            tp.weights_changed()
        out.append(res)
    return out
