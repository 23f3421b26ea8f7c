"""The 8 gloo ranks of benchmarks/perfmodel_validate.py: started once, every plan run inside that
world (its Grid and Trainer built, `warmup` untimed and `steps` timed steps, each step starting
after a barrier and lasting until the slowest rank finishes it), its groups freed before the next.
"""
from __future__ import annotations

import gc
import statistics
import time
import warnings
from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from axon import trainer
from axon.config import RunConfig
from launch import dist as launch_dist
from launch.grid import Grid
from launch.local import free_port, join_generation, local_store
from perfmodel.specs import AXES, Plan
from perfmodel.validation import MEMORY_KEYS

WORLD = 8


def plan_name(p: Plan) -> str:
    degs = " ".join(f"{a}{getattr(p, a)}" for a in reversed(AXES) if getattr(p, a) > 1) or "single"
    knobs = []
    if p.pp > 1:
        knobs.append(p.schedule + (f"/v{p.virtual_stages}" if p.virtual_stages > 1 else ""))
    if p.micro_batch_size > 1:
        knobs.append(f"mbs{p.micro_batch_size}")
    if p.zero:
        knobs.append(f"zero{p.zero}")
    if p.recompute != "none":
        knobs.append(f"rc-{p.recompute}")
    if p.sequence_parallel:
        knobs.append("sp")
    if p.cp > 1 and p.cp_mode != "ring":
        knobs.append(p.cp_mode)
    return " ".join([degs] + knobs)


def _measure(cfg: RunConfig, warmup: int, steps: int) -> dict[str, Any]:
    """This rank's step times and measured memory for cfg.plan (run inside the world)."""
    grid = Grid.build(cfg.plan, dist.get_rank(), dist.get_world_size())
    t = trainer.Trainer(cfg, grid, torch.device("cpu"))
    times, mem = [], None
    try:
        for step in range(warmup + steps):
            dist.barrier()
            t0 = time.perf_counter()
            t.step(step)
            dt = time.perf_counter() - t0
            if step == 0:
                mem = t.measured_memory()
            if step >= warmup:
                times.append(dt)
    finally:
        t.engine.remove()
    return {"times": times, "memory": mem}


def _worker(rank: int, port: int, cfg: RunConfig, plans: list[dict], warmup: int, steps: int, out: Any) -> None:
    warnings.filterwarnings("ignore")
    timeout_s = launch_dist.timeout_for("gloo", cfg.launch.timeout_s)
    store = local_store(rank, WORLD, port, timeout_s)
    for i, p in enumerate(plans):
        t0 = time.perf_counter()
        join_generation(store, rank, WORLD, i, timeout_s)  # a fresh world per plan
        try:
            r = _measure(replace(cfg, plan=Plan.from_dict(p)), warmup, steps)
        except Exception as e:  # noqa: BLE001 - report the plan as failed and go on with the next
            r = {"error": f"{type(e).__name__}: {e}"[:300]}
        dist.destroy_process_group()  # with the plan's groups (their gloo threads would pile up)
        gc.collect()
        out.put((i, rank, r, time.perf_counter() - t0))
    join_generation(store, rank, WORLD, len(plans), timeout_s)
    dist.barrier()  # rank 0 hosts the store: it leaves last
    dist.destroy_process_group()


def run_plans(cfg: RunConfig, plans: list[Plan], warmup: int, steps: int, save: Any) -> list[dict[str, Any]]:
    """Measure every plan in one 8-rank world; per plan: step time (median over steps of the
    slowest rank) and memory (the rank with the most model states + activations). `save(results)`
    is called after each plan (a long run interrupted keeps what it measured)."""
    port = free_port()
    ctx = mp.get_context("spawn")
    out = ctx.SimpleQueue()
    procs = mp.spawn(_worker, args=(port, cfg, [p.to_dict() for p in plans], warmup, steps, out),
                     nprocs=WORLD, join=False)
    per_plan: dict[int, dict[int, Any]] = {}
    results = []
    done = 0
    while done < len(plans):
        i, rank, r, wall = out.get()
        per_plan.setdefault(i, {})[rank] = r
        if len(per_plan[i]) < WORLD:
            continue
        done += 1
        ranks = per_plan.pop(i)
        errors = [r["error"] for r in ranks.values() if "error" in r]
        if errors:
            print(f"  [{done}/{len(plans)}] {plan_name(plans[i]):<42} FAILED {errors[0]}", flush=True)
            continue
        step_s = statistics.median(max(ranks[k]["times"][j] for k in ranks) for j in range(steps))
        worst = max(ranks.values(), key=lambda r: sum(r["memory"][k] for k in MEMORY_KEYS))
        results.append({"plan": plans[i].to_dict(), "step_time_s": step_s, "memory": worst["memory"]})
        save(results)
        print(f"  [{done}/{len(plans)}] {plan_name(plans[i]):<42} {step_s:7.3f} s/step  ({wall:.0f} s)", flush=True)
    procs.join()
    return results
