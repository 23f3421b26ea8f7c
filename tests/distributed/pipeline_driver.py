"""Rank-side functions for the pipeline tests (importable by the gloo worker pools).

`parity(...)` runs one step of a pipelined model and, on the same rank, the same data through
the whole model in one process; it returns the largest relative differences of the loss and of
every gradient this rank holds, plus the measured activation memory. The single-process run
(`reference`) is computed once per worker and (dp, microbatches, micro-batch size).
"""
from __future__ import annotations

import os
from dataclasses import replace

import torch
import torch.distributed as dist
import torch.nn.functional as F

from axon.init import materialize
from axon.model import GPT, build
from launch.grid import Grid
from tests.distributed.tp_driver import local_slice
from parallel.data import DataParallel
from parallel.head_loss import fused, of_logits
from parallel import tensor
from parallel.layout import replicated
from parallel.pipeline import apply
from perfmodel.specs import ModelSpec, Offload, Plan

SPEC = ModelSpec(n_layers=8, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, vocab_size=64, max_seq_len=16)
SEQ, SEED = 8, 3


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum")


def make_plan(pp: int, schedule: str, dp: int = 1, virtual_stages: int | None = None, offload: float = 0.0,
              mbs: int = 2, tp_col: int = 1) -> Plan:
    v = virtual_stages if virtual_stages is not None else (2 if schedule in ("zbv", "vhalf", "vmin") else 1)
    return Plan(dp=dp, pp=pp, tp_col=tp_col, schedule=schedule, virtual_stages=v, micro_batch_size=mbs,
                offload=Offload(activations=offload))


def batch(step: int, shard: int, samples: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * step + shard)
    return torch.randint(0, SPEC.vocab_size, (samples, SEQ + 1), generator=g)  # [samples, S+1]


def chunk_builder(spec: ModelSpec):
    return lambda layer_ids, has_embedding, has_head: GPT(spec, layer_ids, has_embedding, has_head)


def microbatches_of(local: torch.Tensor, mbs: int) -> list:
    positions = torch.arange(SEQ)
    return [(mb[:, :-1], mb[:, 1:], positions) for mb in local.split(mbs)]


_REFERENCES: dict[tuple, tuple[float, dict[str, torch.Tensor]]] = {}


def reference(dp: int, microbatches: int, mbs: int, spec: ModelSpec = SPEC) -> tuple[float, dict[str, torch.Tensor]]:
    """The single-process run of one step: the whole model, every dp shard's samples (the same
    microbatches as the pipelined step), in one process: (the loss sum, every parameter's gradient).
    It depends only on its arguments and the module's constants, so each worker computes it once
    per key (kept for the life of the worker: the many configs and schedules that share it)."""
    key = (spec, SEED, SEQ, dp, microbatches, mbs)
    if key not in _REFERENCES:
        ref = build(spec)
        materialize(ref, spec, SEED, torch.device("cpu"))
        global_tokens = microbatches * mbs * dp * SEQ
        ref_loss = torch.zeros(())
        for shard in range(dp):
            for inputs, targets, positions in microbatches_of(batch(0, shard, microbatches * mbs), mbs):
                l = loss_fn(ref(inputs, positions), targets)
                (l / global_tokens).backward()
                ref_loss += l.detach()
        _REFERENCES[key] = (ref_loss.item(), {n: p.grad.detach().clone() for n, p in ref.named_parameters()})
    return _REFERENCES[key]


def parity_many(dp: int, pp: int, configs: list[dict], microbatches: int = 4) -> list[dict]:
    """`parity` for each config (make_plan keyword arguments) on one grid of dp x pp ranks."""
    grid = Grid.build(make_plan(pp, "1f1b", dp=dp), dist.get_rank(), dist.get_world_size())
    return [parity(make_plan(pp, dp=dp, **cfg), microbatches, grid=grid) for cfg in configs]


def _die(chunk, x, targets):
    """A loss function that kills its rank (a peer dying in the middle of the schedule)."""
    os._exit(3)


def parity(plan: Plan, microbatches: int, layout=None, kill_rank: int | None = None,
           timeout_s: float = 60.0, grid: Grid | None = None) -> dict:
    grid = grid if grid is not None else Grid.build(plan, dist.get_rank(), dist.get_world_size())
    dp_axis = grid.group("dp", "cp")
    pipe = apply(SPEC, plan, grid, chunk_builder(SPEC), SEQ, layout=layout, timeout_s=timeout_s)
    for chunk in pipe.chunks.values():
        materialize(chunk, SPEC, SEED, torch.device("cpu"))
    named = pipe.named_parameters()
    sync = DataParallel([(list(named.values()), dp_axis.group, dp_axis.size)], bucket_mb=0.001)
    global_samples = microbatches * plan.micro_batch_size * plan.dp
    global_tokens = global_samples * SEQ
    local = batch(0, grid.axis("dp").coord, microbatches * plan.micro_batch_size)
    killer = _die if kill_rank is not None and grid.rank == kill_rank else fused
    loss = pipe.step(microbatches_of(local, plan.micro_batch_size), killer, global_tokens, sync, track_memory=True)
    sync.finish()
    sync.remove()
    pp_group = grid.axis("pp").group
    if plan.pp > 1:
        dist.all_reduce(loss, group=pp_group)  # the loss lives on one pp rank
    if dp_axis.size > 1:
        dist.all_reduce(loss, group=dp_axis.group)
    ref_loss, ref_grads = reference(plan.dp, microbatches, plan.micro_batch_size)
    grad_err = max(((named[n].grad - ref_grads[n]).norm() / ref_grads[n].norm()).item() for n in named)
    return {"loss_err": abs(loss.item() - ref_loss) / ref_loss, "grad_err": grad_err,
            "names": sorted(named), "memory": pipe.last_memory, "layers": [list(r) for r in pipe.layers]}


TP_SPEC = replace(SPEC, n_layers=4)  # one Block per chunk of a pp=2 V (zbv), two per 1f1b stage


def parity_tp(schedules: list[str], microbatches: int = 4, spec: ModelSpec = TP_SPEC) -> list[dict]:
    """pp2 x tp2 x dp2 (8 ranks): tensor parallelism applied to every chunk, gradients summed over
    each parameter's grad_axes; compared with this rank's slices of the single-process gradients.
    `spec` defaults to the 4-layer model: every chunk still holds a Block (the first also the
    embedding, the last the head), at half the tensor-parallel collectives of SPEC on gloo."""
    grid = Grid.build(make_plan(2, "1f1b", dp=2, tp_col=2), dist.get_rank(), dist.get_world_size())
    out = []
    for schedule in schedules:
        plan = make_plan(2, schedule, dp=2, tp_col=2, mbs=1)
        pipe = apply(spec, plan, grid, chunk_builder(spec), SEQ)
        tps = {c: tensor.apply(chunk, spec, plan, grid) for c, chunk in pipe.chunks.items()}
        for c, chunk in pipe.chunks.items():
            materialize(chunk, spec, SEED, torch.device("cpu"), tps[c].layouts)
        last = pipe.n_chunks - 1
        global_tokens = microbatches * plan.dp * SEQ
        local = batch(0, grid.axis("dp").coord, microbatches)
        tp_loss = of_logits(tps[last].loss_fn) if last in tps else fused
        loss = pipe.step(microbatches_of(local, 1), tp_loss, global_tokens, None)
        dist.all_reduce(loss, group=grid.axis("pp").group)
        dist.all_reduce(loss, group=grid.group("dp", "cp").group)
        ref_loss, ref_grads = reference(plan.dp, microbatches, 1, spec)
        grad_err = 0.0
        for c, chunk in pipe.chunks.items():
            for name, p in chunk.named_parameters():
                layout = tps[c].layouts.get(name) or replicated(p.shape)
                dist.all_reduce(p.grad, group=grid.group(*layout.grad_axes).group)
                want = local_slice(ref_grads[name], layout.shard).reshape(p.shape)
                grad_err = max(grad_err, ((p.grad - want).norm() / want.norm().clamp_min(1e-3)).item())
        out.append({"loss_err": abs(loss.item() - ref_loss) / ref_loss, "grad_err": grad_err})
    return out
