"""Tensor-parallel collectives per training step and tokens/s (issue 22: the input gradient is
reduced once per group of projections that read the same input, 2 per layer, not 5).

    .venv/bin/python benchmarks/tp_collectives.py                  # tp_col=2: 1D, +SP; ~1 minute
    .venv/bin/python benchmarks/tp_collectives.py --trials 10

Spawns tp_col=2 gloo ranks on 127.0.0.1 (launch/local.py) and, per layout, builds the model, runs
`warmup` then `trials` steps (forward, vocab-parallel loss, backward; MICRO microbatches) and
prints the step's collectives over tp_col (calls and MB, from `TensorParallel.comm`) and the
median tokens/s (global tokens / slowest rank's step time). Another commit's numbers: run this
file from a checkout of that commit (the counters are the same).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist

from launch.local import spawn

SPEC = dict(n_layers=4, d_model=256, n_heads=8, n_kv_heads=4, d_ff=688, vocab_size=2048)
SEQ, BATCH, MICRO, SEED = 256, 4, 2, 0
LAYOUTS = {"1d": dict(tp_col=2), "1d +sp": dict(tp_col=2, sequence_parallel=True)}


def _measure(plan_kw: dict, trials: int, warmup: int) -> dict:
    """On every rank: step times (slowest rank) and one step's tp_col collectives {kind: (calls, bytes)}."""
    from axon.init import materialize
    from axon.model import build
    from launch.grid import Grid
    from parallel.tensor import apply
    from perfmodel.specs import ModelSpec, Plan

    spec, plan = ModelSpec(max_seq_len=SEQ, **SPEC), Plan(**plan_kw)
    grid = Grid.build(plan, dist.get_rank(), dist.get_world_size())
    model = build(spec)
    tp = apply(model, spec, plan, grid)
    materialize(model, spec, SEED, torch.device("cpu"), tp.layouts)
    gen = torch.Generator().manual_seed(1)
    times, per_step = [], {}
    for trial in range(warmup + trials):
        tokens = torch.randint(0, spec.vocab_size, (BATCH, SEQ + 1), generator=gen)  # [BATCH, SEQ + 1]
        tp.comm.reset()
        dist.barrier()
        t0 = time.perf_counter()
        for mb in tokens.chunk(MICRO):  # [BATCH / MICRO, SEQ + 1]
            (tp.loss_fn(model(mb[:, :-1]), mb[:, 1:]) / (BATCH * SEQ)).backward()
        dt = torch.tensor([time.perf_counter() - t0])
        dist.all_reduce(dt, op=dist.ReduceOp.MAX)
        per_step = {kind: (tp.comm.calls[(axis, kind)], n) for (axis, kind), n in tp.comm.bytes.items()
                    if axis == "tp_col"}
        if trial >= warmup:
            times.append(dt.item())
        for p in model.parameters():
            p.grad = None
    return {"times": times, "collectives": per_step}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()
    print(f"model {SPEC}, seq {SEQ}, batch {BATCH} in {MICRO} microbatches, tp_col=2, gloo, 1 thread per rank")
    print("\n| layout | tp_col collectives per step (calls, MB) | tok/s (median) |\n|---|---|---:|")
    for name, plan_kw in LAYOUTS.items():
        res = spawn(2, _measure, plan_kw, args.trials, args.warmup)[0]
        coll = ", ".join(f"{kind} {calls} ({nbytes / 2**20:.1f})"
                         for kind, (calls, nbytes) in sorted(res["collectives"].items()))
        print(f"| {name} | {coll} | {BATCH * SEQ / statistics.median(res['times']):,.0f} |")


if __name__ == "__main__":
    main()
