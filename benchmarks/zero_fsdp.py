"""Our ZeRO-3 (`parallel.zero`) against PyTorch FSDP2 (`torch.distributed.fsdp.fully_shard`,
also ZeRO-3), and a model that only fits a per-rank device-memory cap with ZeRO-3 + offload.

    .venv/bin/python -m benchmarks.zero_fsdp                    # 4 ranks, a few minutes
    .venv/bin/python -m benchmarks.zero_fsdp --ranks 2 --trials 4

Spawns gloo ranks on 127.0.0.1 (one CPU thread each); every rank builds the same model (same
seed) and trains on the same seeded batches, fp32, one microbatch per step.

1. Speed (paired): both models live in the same ranks; a trial runs one full step (forward,
   backward, sharded gradient reduction, global-norm clip, AdamW, parameters regathered) of
   each, order alternating, each step starting at a barrier. Reported: median global tokens/s
   of each and the median of the per-trial ratio ours/FSDP2, and the losses of the first steps
   (the two must agree: same model, data and update). FSDP2: each Block `fully_shard`ed, then
   the root; gradient divide factor 1 with plain SUM reductions (we sum: the loss is divided by the global token count);
   torch AdamW (foreach=False) and clip_grad_norm_ on its DTensors.
2. Peak memory (separate fresh ranks per framework): peak resident memory growth per rank during
   training, VmHWM after a reset (/proc/self/clear_refs) minus the resident size before the
   model was built; large allocations are forced to mmap (MALLOC_MMAP_THRESHOLD_) so freed
   tensors leave the resident set. The init-time full model (both frameworks shard an already
   materialized model) is excluded by the reset.
3. Memory cap: a model whose device-resident bytes per rank (model states on the device +
   peak saved activations + ZeRO-3's gathered buffers, as axon.memory measures them) exceed
   --cap-mb at zero=0 and fit at zero=3 + optimizer offload + full recomputation; both are
   trained a few steps (the same losses: the techniques change memory, not the math). On this CPU machine "device" and "host" are the same RAM, so
   the cap is checked on the accounting, not enforced by an allocator.
Only ratios within one run are meant to be compared; absolute times move with the machine load.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from axon.memory import ActivationMeter, model_state_bytes
from launch.grid import Grid
from launch.local import free_port, init_local
from perfmodel.flops import n_params
from perfmodel.specs import ModelSpec, Offload, Plan
from tests.distributed import zero_driver as drv  # the ZeRO tests' driver (one copy of the step)

BENCH = ModelSpec(n_layers=4, d_model=256, n_heads=8, n_kv_heads=4, d_ff=688, vocab_size=256, max_seq_len=128)
CAP_MODEL = ModelSpec(n_layers=6, d_model=384, n_heads=6, n_kv_heads=6, d_ff=1024, vocab_size=256, max_seq_len=64)
SEQ, GLOBAL_BATCH = 128, 8


def _status_kb(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def setup(kind: str, plan: Plan, spec: ModelSpec) -> tuple[torch.nn.Module, Any, Grid]:
    return drv.make(plan, spec) if kind != "fsdp2" else drv.make_fsdp2(plan, spec)


def _step(model: torch.nn.Module, engine: Any, grid: Grid, plan: Plan, step: int, spec: ModelSpec, seq: int) -> float:
    return drv.train_step(model, engine, grid, plan, step, spec, seq, GLOBAL_BATCH)


def speed(rank: int, world: int, port: int, trials: int, out: Any) -> None:
    init_local(rank, world, port)
    plan = Plan(dp=world, zero=3, micro_batch_size=GLOBAL_BATCH // world)
    runs = {k: setup(k, plan, BENCH) for k in ("ours", "fsdp2")}
    times: dict[str, list[float]] = {"ours": [], "fsdp2": []}
    losses: dict[str, list[float]] = {"ours": [], "fsdp2": []}
    for trial in range(trials + 2):
        order = ("ours", "fsdp2") if trial % 2 == 0 else ("fsdp2", "ours")
        for kind in order:
            dist.barrier()
            t0 = time.perf_counter()
            losses[kind].append(_step(*runs[kind], plan, trial, BENCH, SEQ))
            dist.barrier()
            if trial >= 2:  # warm-up
                times[kind].append(time.perf_counter() - t0)
    if rank == 0:
        out.put({"times": times, "losses": losses})
    dist.destroy_process_group()


def peak_memory(rank: int, world: int, port: int, kind: str, steps: int, out: Any) -> None:
    init_local(rank, world, port)
    base = _status_kb("VmRSS")
    plan = Plan(dp=world, zero=3, micro_batch_size=GLOBAL_BATCH // world)
    run = setup(kind, plan, BENCH)
    _step(*run, plan, 0, BENCH, SEQ)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident size to the current one
    for s in range(1, steps + 1):
        _step(*run, plan, s, BENCH, SEQ)
    states = model_state_bytes(run[1].state_tensors())
    out.put((rank, _status_kb("VmHWM") - base, states))
    dist.destroy_process_group()


def capped(rank: int, world: int, port: int, plan: Plan, steps: int, out: Any) -> None:
    init_local(rank, world, port)
    model, engine, grid = drv.make(plan, CAP_MODEL)
    losses = []
    with ActivationMeter() as meter:
        for s in range(steps):
            losses.append(drv.train_step(model, engine, grid, plan, s, CAP_MODEL, 64, GLOBAL_BATCH, lr=3e-3))
    states = model_state_bytes(engine.state_tensors())
    gathered = 0
    if plan.zero == 3:  # the current Block and the prefetched one, gathered at once
        blocks = [u for u in engine.units if not u.root]
        root = [u for u in engine.units if u.root]
        gathered = 2 * max(u.full.numel() for u in blocks) * 4 + sum(u.full.numel() * 4 for u in root)
    device = states["params"] + states["grads"] + states["optimizer"] + meter.peak + gathered
    out.put((rank, {"device": device, "activations": meter.peak, "gathered": gathered, **states, "losses": losses}))
    dist.destroy_process_group()


def _spawn(fn: Any, world: int, *args: Any) -> list[Any]:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=fn, args=(r, world, port, *args, out)) for r in range(world)]
    for p in procs:
        p.start()
    results = []
    expected = 1 if fn is speed else world
    for _ in range(expected):
        results.append(out.get(timeout=3600))
    for p in procs:
        p.join()
        if p.exitcode:
            raise RuntimeError(f"{fn.__name__}: a rank exited with {p.exitcode}")
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--cap-mb", type=float, default=64.0)
    args = ap.parse_args()
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # inherited by the spawned ranks
    os.environ["OMP_NUM_THREADS"] = "1"
    w = args.ranks
    mib = 2 ** 20
    print(f"model {BENCH} ({n_params(BENCH) / 1e6:.2f}M params), {w} gloo ranks, global batch {GLOBAL_BATCH} x "
          f"seq {SEQ}, fp32, load average {os.getloadavg()[0]:.1f}")

    res = _spawn(speed, w, args.trials)[0]
    tokens = GLOBAL_BATCH * SEQ
    ratio = [f / o for o, f in zip(res["times"]["ours"], res["times"]["fsdp2"])]
    for kind in ("ours", "fsdp2"):
        print(f"  {kind:6s} tokens/s median {tokens / statistics.median(res['times'][kind]):9.1f}")
    q = statistics.quantiles(ratio, n=4) if len(ratio) > 1 else [ratio[0]] * 3
    print(f"  tokens/s ours/fsdp2 median {statistics.median(ratio):.3f} [{q[0]:.3f}-{q[2]:.3f}] over {len(ratio)} trials")
    print(f"  losses ours  {[round(x, 5) for x in res['losses']['ours'][:4]]}")
    print(f"  losses fsdp2 {[round(x, 5) for x in res['losses']['fsdp2'][:4]]}")

    for kind in ("ours", "fsdp2"):
        rows = sorted(_spawn(peak_memory, w, kind, 4))
        peaks = [r[1] / mib for r in rows]
        st = rows[0][2]
        print(f"  {kind:6s} peak RSS growth per rank (MiB) {[round(p, 1) for p in peaks]}  max {max(peaks):.1f}; "
              f"rank-0 model states params {st['params'] / mib:.2f} grads {st['grads'] / mib:.2f} "
              f"optimizer {st['optimizer'] / mib:.2f} MiB")

    print(f"memory cap {args.cap_mb} MiB per rank (device-resident), model {CAP_MODEL} "
          f"({n_params(CAP_MODEL) / 1e6:.2f}M params), {w} ranks")
    for label, plan in (("zero=0", Plan(dp=w, micro_batch_size=GLOBAL_BATCH // w)),
                        ("zero=3+offload+full", Plan(dp=w, zero=3, micro_batch_size=GLOBAL_BATCH // w,
                                                     offload=Offload(optimizer=True), recompute="full"))):
        rank0 = sorted(_spawn(capped, w, plan, 5), key=lambda r: r[0])[0][1]
        verdict = "fits" if rank0["device"] <= args.cap_mb * mib else "EXCEEDS the cap (would OOM)"
        print(f"  {label:20s} device {rank0['device'] / mib:6.2f} MiB = params {rank0['params'] / mib:.2f} + grads "
              f"{rank0['grads'] / mib:.2f} + optimizer {rank0['optimizer'] / mib:.2f} + activations "
              f"{rank0['activations'] / mib:.2f} + gathered {rank0['gathered'] / mib:.2f}; host "
              f"{rank0['host'] / mib:.2f} MiB -> {verdict}; losses {[round(x, 3) for x in rank0['losses']]}")


if __name__ == "__main__":
    main()
