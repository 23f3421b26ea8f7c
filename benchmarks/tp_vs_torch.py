"""Our tensor parallelism (`parallel.tensor`) against PyTorch's own, in one run; overlap on vs off.

    .venv/bin/python benchmarks/tp_vs_torch.py                     # tp = 2 and 4, a few minutes
    .venv/bin/python benchmarks/tp_vs_torch.py --ranks 2 --trials 4

For each tensor-parallel degree t the script spawns t gloo ranks on 127.0.0.1 and builds the
same model (same seed) once per variant:

    torch t        torch.distributed.tensor.parallel: ColwiseParallel (wq, wk, wv, w_gate, w_up,
                   head), RowwiseParallel (wo, w_down, embedding), loss_parallel
    torch t +sp    the same plus SequenceParallel norms and PrepareModuleInput gathers (torchtitan's plan)
    axon X,Y,Z     our 3D layout tp_col=X, tp_row=Y, tp_depth=Z, all overlap switches on
    ... +sp        with sequence parallelism;  ... no-overlap: every overlap switch off
    ... cache      with cache_tp_weights (gathered weights kept across the step's microbatches)

A trial runs one training step of every variant (forward, loss, backward, SGD update) in an
order rotated each trial, each step starting at a barrier. The global batch is the same for
all variants: a 1D layout (and PyTorch) feeds every rank the whole batch; tp_depth=Z splits it
into Z parts. Reported: median tokens/s (global tokens / slowest rank's step time) over trials
after warm-up, and the median of the per-trial ratio to `torch t` (paired, seconds apart).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from launch.local import free_port, init_local

SPEC = dict(n_layers=4, d_model=256, n_heads=8, n_kv_heads=4, d_ff=688, vocab_size=2048)
SEQ, BATCH, MICRO, SEED = 256, 4, 2, 0


def _torch_variant(spec, grid_world: int, sp: bool):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    from axon.init import materialize
    from axon.model import build
    from benchmarks.e2e_peers.tensor_parallel import tp_plan

    mesh = init_device_mesh("cpu", (grid_world,))
    model = build(spec)
    materialize(model, spec, SEED, torch.device("cpu"))
    parallelize_module(model, mesh, tp_plan(model, sp))

    def step(tokens: torch.Tensor, n_tokens: int) -> None:
        from torch.distributed.tensor.parallel import loss_parallel
        for i in range(tokens.shape[0] // (BATCH // MICRO)):
            mb = tokens[i * (BATCH // MICRO):(i + 1) * (BATCH // MICRO)]
            logits = model(mb[:, :-1])
            with loss_parallel():
                loss = F.cross_entropy(logits.flatten(0, 1), mb[:, 1:].flatten(), reduction="sum")
                (loss / n_tokens).backward()
    return model, step


def _axon_variant(spec, plan_kw: dict):
    from axon.init import materialize
    from axon.model import build
    from launch.grid import Grid
    from parallel.tensor import apply
    from perfmodel.specs import Plan

    plan = Plan(**plan_kw)
    grid = Grid.build(plan, dist.get_rank(), dist.get_world_size())
    model = build(spec)
    tp = apply(model, spec, plan, grid)
    materialize(model, spec, SEED, torch.device("cpu"), tp.layouts)
    z, zc = plan.tp_depth, grid.axis("tp_depth").coord
    depth_group = grid.axis("tp_depth").group

    def step(tokens: torch.Tensor, n_tokens: int) -> None:
        mine = tokens.chunk(z)[zc]  # depth splits the batch
        per = mine.shape[0] // MICRO
        for i in range(MICRO):
            mb = mine[i * per:(i + 1) * per]
            loss = tp.loss_fn(model(mb[:, :-1]), mb[:, 1:])
            (loss / n_tokens).backward()
        for name, p in model.named_parameters():  # the data-parallel wrapper's job, here over depth only
            if "tp_depth" in tp.layouts[name].grad_axes and z > 1:
                dist.all_reduce(p.grad, group=depth_group)
    return model, step


def variants(t: int) -> list[tuple[str, dict]]:
    out = [(f"torch {t}", {"torch": False}), (f"torch {t} +sp", {"torch": True})]
    layouts = [(t, 1, 1)] + ([(2, 2, 1), (2, 1, 2)] if t == 4 else [(1, 1, 2)])
    off = dict(overlap_tp_input_grad=False, overlap_tp_depth_reduce=False, prefetch_tp_weights=False)
    for x, y, z in layouts:
        kw = dict(tp_col=x, tp_row=y, tp_depth=z)
        name = f"axon {x},{y},{z}"
        out.append((name, kw))
        out.append((name + " no-overlap", dict(kw, **off)))
        if x > 1:
            out.append((name + " +sp", dict(kw, sequence_parallel=True)))
        if z > 1:
            out.append((name + " cache", dict(kw, cache_tp_weights=True)))
    return out


def _worker(rank: int, world: int, port: int, trials: int, warmup: int, queue) -> None:
    from perfmodel.specs import ModelSpec

    init_local(rank, world, port)
    spec = ModelSpec(max_seq_len=SEQ, **SPEC)
    built = []
    for name, kw in variants(world):
        if "torch" in kw:
            model, step = _torch_variant(spec, world, kw["torch"])
        else:
            model, step = _axon_variant(spec, kw)
        built.append((name, model, step))
    gen = torch.Generator().manual_seed(1)
    times: dict[str, list[float]] = {name: [] for name, _, _ in built}
    for trial in range(warmup + trials):
        tokens = torch.randint(0, spec.vocab_size, (BATCH, SEQ + 1), generator=gen)
        order = built[trial % len(built):] + built[:trial % len(built)]
        for name, model, step in order:
            dist.barrier()
            t0 = time.perf_counter()
            step(tokens, BATCH * SEQ)
            with torch.no_grad():
                for p in model.parameters():
                    p -= 1e-3 * p.grad
                    p.grad = None
            dt = torch.tensor([time.perf_counter() - t0])
            dist.all_reduce(dt, op=dist.ReduceOp.MAX)
            if trial >= warmup:
                times[name].append(dt.item())
    if rank == 0:
        queue.put(times)
    dist.destroy_process_group()


def run(world: int, trials: int, warmup: int) -> dict[str, list[float]]:
    port = free_port()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, world, port, trials, warmup, queue)) for r in range(world)]
    for p in procs:
        p.start()
    while True:
        try:
            times = queue.get(timeout=5)
            break
        except Exception:  # noqa: BLE001 - queue.Empty: keep waiting while every rank is alive
            if any(p.exitcode not in (None, 0) for p in procs):
                for p in procs:
                    p.kill()
                raise SystemExit(f"a rank failed (exit codes {[p.exitcode for p in procs]}); see its traceback above")
    for p in procs:
        p.join()
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--trials", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()
    print(f"model {SPEC}, seq {SEQ}, global batch {BATCH} in {MICRO} microbatches, gloo, 1 thread per rank")
    for world in args.ranks:
        times = run(world, args.trials, args.warmup)
        base = times[f"torch {world}"]
        print(f"\n| tp={world} variant | tok/s | ratio vs torch {world} (paired median) |\n|---|---:|---:|")
        for name, ts in times.items():
            ratio = statistics.median(b / t for b, t in zip(base, ts))
            print(f"| {name} | {BATCH * SEQ / statistics.median(ts):,.0f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
