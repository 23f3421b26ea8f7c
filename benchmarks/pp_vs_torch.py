"""Our pipeline runtime against torch.distributed.pipelining on the same model, stages and
microbatches, in one run (gloo, CPU, fp32).

    PYTHONPATH=. .venv/bin/python benchmarks/pp_vs_torch.py                    # pp=4, 8 microbatches
    PYTHONPATH=. .venv/bin/python benchmarks/pp_vs_torch.py --pp 2 --trials 4

Variants, all on the very same chunk modules (built by parallel.pipeline.apply, so the same
layer split and the same initial weights):
    ours 1f1b            Pipeline.step with parallel.schedule=1f1b
    torch Schedule1F1B   torch.distributed.pipelining.Schedule1F1B, one PipelineStage per rank
    ours interleaved     parallel.schedule=interleaved, virtual_stages=2
    torch Interleaved    ScheduleInterleaved1F1B, two PipelineStages per rank
A trial runs one training step (forward + backward of every microbatch; no optimizer) of each
variant in an order rotated every trial, each step starting at a barrier; the step time is the
slowest rank's. Reported: median tokens/s over the trials after one warm-up, the median of the
per-trial ratio ours / torch (paired: the two ran seconds apart), and the same ratio of the CPU
seconds the step used, summed over the ranks (with more ranks than cores, the CPU work is what the
throughput is made of, and it is much less sensitive to other load on the machine than wall time).
Absolute times move with load.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleInterleaved1F1B

from benchmarks.pp_common import Stage, build_pipeline, head_loss, loss_fn, microbatches, plan_for
from launch.grid import Grid
from launch.local import spawn
from perfmodel.specs import ModelSpec


def _rank(spec: ModelSpec, pp: int, m: int, seq: int, trials: int) -> dict:
    grid = Grid.build(plan_for(pp, "1f1b"), dist.get_rank(), dist.get_world_size())
    me, group = grid.axis("pp").coord, grid.axis("pp").group
    tokens = m * seq
    scaled = lambda out, target: loss_fn(out, target) / tokens  # noqa: E731 (same objective as ours)
    variants = {}
    for name, schedule, v in (("1f1b", "1f1b", 1), ("interleaved", "interleaved", 2)):
        pipe = build_pipeline(spec, plan_for(pp, schedule, virtual_stages=v), grid, seq)
        n = pipe.n_chunks
        stages = [PipelineStage(Stage(pipe.chunks[c], c == 0, c == n - 1, seq), c, n, torch.device("cpu"),
                                group=group) for c in sorted(pipe.chunks)]
        torch_sched = (Schedule1F1B(stages[0], m, loss_fn=scaled, scale_grads=False) if v == 1 else
                       ScheduleInterleaved1F1B(stages, m, loss_fn=scaled, scale_grads=False))
        params = list(pipe.named_parameters().values())
        variants[f"ours {name}"] = (params, lambda mbs, pipe=pipe: pipe.step(mbs, head_loss, tokens, None))
        variants[f"torch {name}"] = (params, lambda mbs, s=torch_sched, n=n: _torch_step(s, mbs, me, n, pp))
    names = list(variants)
    times: dict[str, list[float]] = {k: [] for k in names}
    cpu_s: dict[str, list[float]] = {k: [] for k in names}  # CPU seconds of the step, summed over ranks
    for trial in range(trials + 1):
        mbs = microbatches(spec, m, 1, seq, trial)
        for k in range(len(names)):
            name = names[(k + trial) % len(names)]
            params, run = variants[name]
            for p in params:
                p.grad = None
            dist.barrier()
            t0, c0 = time.perf_counter(), time.process_time()
            run(mbs)
            dt = torch.tensor(time.perf_counter() - t0)
            cpu = torch.tensor(time.process_time() - c0)
            dist.all_reduce(dt, op=dist.ReduceOp.MAX)
            dist.all_reduce(cpu)
            if trial > 0:
                times[name].append(dt.item())
                cpu_s[name].append(cpu.item())
    return {"times": times, "cpu": cpu_s, "tokens": tokens}


def _torch_step(sched, mbs: list, me: int, n_chunks: int, pp: int) -> None:
    inputs = torch.cat([mb[0] for mb in mbs])  # [m, S]: the schedule splits it into microbatches
    targets = torch.cat([mb[1] for mb in mbs])
    holds_first, holds_last = me == 0, (n_chunks - 1) % pp == me
    args = (inputs,) if holds_first else ()
    sched.step(*args, target=targets if holds_last else None, losses=[] if holds_last else None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pp", type=int, default=4)
    ap.add_argument("--microbatches", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--trials", type=int, default=6)
    a = ap.parse_args()
    spec = ModelSpec(n_layers=a.layers, d_model=a.d_model, n_heads=8, n_kv_heads=4, d_ff=4 * a.d_model,
                     vocab_size=512, max_seq_len=a.seq)
    res = spawn(a.pp, _rank, spec, a.pp, a.microbatches, a.seq, a.trials)[0]
    times, tokens = res["times"], res["tokens"]
    print(f"pp={a.pp} microbatches={a.microbatches} seq={a.seq} layers={a.layers} d_model={a.d_model} "
          f"trials={a.trials} (gloo, CPU, fp32, 1 thread per rank)")
    print("| schedule | ours tok/s | torch tok/s | ours / torch tok/s (median of paired trials) "
          "| torch / ours CPU s per step (summed over ranks) |")
    print("|---|---|---|---|---|")
    cpu = res["cpu"]
    for name in ("1f1b", "interleaved"):
        ours, theirs = times[f"ours {name}"], times[f"torch {name}"]
        ratio = statistics.median(t / o for o, t in zip(ours, theirs))
        cpu_ratio = statistics.median(t / o for o, t in zip(cpu[f"ours {name}"], cpu[f"torch {name}"]))
        print(f"| {name} | {tokens / statistics.median(ours):.0f} | {tokens / statistics.median(theirs):.0f} | "
              f"{ratio:.3f} | {cpu_ratio:.3f} |")


if __name__ == "__main__":
    main()
