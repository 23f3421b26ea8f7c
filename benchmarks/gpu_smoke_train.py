"""The training-level checks of benchmarks/gpu_smoke.py: whole `axon.trainer` runs on one device
(optimizer offload parity, checkpoint resume, a small Llama bf16 step) and one rank of 8-rank
layouts over torch's fake process group (ZeRO-3 dp=8, pp=4 1F1B), measured memory beside the
performance model's prediction (plan.json).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from benchmarks.gpu_smoke_checks import Ctx, Skip

# ~1.2 B parameters: Llama 3's shape, narrower and shallower (one H100/H200 runs a step in seconds)
SMALL_LLAMA = ["model=llama3-8b", "model.n_layers=16", "model.d_model=2048", "model.n_heads=16", "model.n_kv_heads=8",
               "model.d_ff=8192"]


def _overrides(ctx: Ctx, run_dir: Path, extra: list[str]) -> list[str]:
    base = ["model=tiny", "train.progress=false", "logger.wandb.mode=disabled", f"run.dir={run_dir}",
            "train.global_batch_size=4", "train.seq_len=64"]
    base += ["cluster=local-cpu", "train.dtype=fp32"] if ctx.cpu else ["cluster=dgx-h100", "train.dtype=bf16"]
    return base + extra


def _train(ctx: Ctx, run_dir: Path, extra: list[str], world: int = 1) -> tuple[list[dict], dict]:
    """Run the trainer in this process (the process group must exist); metrics and plan.json."""
    from axon import trainer
    from axon.config import freeze, load
    from axon.metrics import read_metrics
    from axon.train import resolve_plan
    from launch.grid import Grid

    cfg = freeze(load(_overrides(ctx, run_dir, extra)))
    cfg, info = resolve_plan(cfg, world, [])
    grid = Grid.build(cfg.plan, 0, world, timeout_s=cfg.launch.timeout_s)
    trainer.run(cfg, grid, ctx.device, plan_info=info)
    return read_metrics(run_dir / "metrics.jsonl"), json.loads((run_dir / "plan.json").read_text())


def _world1(ctx: Ctx) -> None:
    from launch import dist as launch_dist
    from launch.env import detect

    launch_dist.init(detect({}), "gloo" if ctx.cpu else "nccl", None)


def _losses(metrics: list[dict]) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in metrics if "loss" in m}


def _max_rel_diff(a: dict[int, float], b: dict[int, float]) -> float:
    if a.keys() != b.keys():
        raise RuntimeError(f"the runs logged different steps: {sorted(a)} vs {sorted(b)}")
    return max(abs(a[s] - b[s]) / max(abs(b[s]), 1e-12) for s in a)


def optimizer_offload(ctx: Ctx) -> dict[str, Any]:
    """The same 3 steps with AdamW on the device and with fp32 master + Adam states on the host."""
    from launch import dist as launch_dist

    _world1(ctx)
    try:
        steps = ["train.steps=3", "checkpoint.at_end=false"]
        plain = _losses(_train(ctx, ctx.work / "plain", steps)[0])
        offload = _losses(_train(ctx, ctx.work / "offload", [*steps, "parallel.offload.optimizer=true"])[0])
    finally:
        launch_dist.shutdown()
    diff = _max_rel_diff(offload, plain)
    tol = 1e-5 if ctx.cpu else 1e-2  # bf16 autocast on GPU: host and device Adam round differently
    if diff > tol:
        raise RuntimeError(f"optimizer offload losses differ from plain AdamW by {diff:.3g} (relative) > {tol}")
    return {"max_rel_loss_diff": diff, "final_loss": plain[max(plain)]}


def checkpoint_resume(ctx: Ctx) -> dict[str, Any]:
    """3 steps straight against 1 step, a checkpoint, and a resumed run to step 3."""
    from launch import dist as launch_dist

    _world1(ctx)
    try:
        straight = _losses(_train(ctx, ctx.work / "straight", ["train.steps=3", "checkpoint.at_end=false"])[0])
        _train(ctx, ctx.work / "resumed", ["train.steps=1", "checkpoint.at_end=true"])
        metrics, plan = _train(ctx, ctx.work / "resumed", ["train.steps=3", "checkpoint.at_end=false"])
    finally:
        launch_dist.shutdown()
    resumed = _losses(metrics)
    if plan.get("resumed_from_step") != 1:
        raise RuntimeError(f"the second run did not resume from step 1 (plan.json: {plan.get('resumed_from_step')})")
    diff = _max_rel_diff({s: resumed[s] for s in (2, 3)}, {s: straight[s] for s in (2, 3)})
    tol = 0.0 if ctx.cpu else 1e-3  # GPU: atomics in embedding backward may reorder sums
    if diff > tol:
        raise RuntimeError(f"resumed losses differ from the straight run by {diff:.3g} (relative) > {tol}")
    return {"max_rel_loss_diff": diff, "checkpoints": len(list((ctx.work / "resumed" / "checkpoints").iterdir()))}


def llama_step(ctx: Ctx) -> dict[str, Any]:
    """A few steps of a ~1.2 B Llama in bf16 (tiny fp32 model on CPU): tokens/s, MFU, the
    allocator's peak against the performance model's predicted device memory."""
    from launch import dist as launch_dist

    size = ["train.steps=2"] if ctx.cpu else [*SMALL_LLAMA, "train.steps=5", "train.global_batch_size=8",
                                              "train.seq_len=2048", "parallel.micro_batch_size=2"]
    _world1(ctx)
    try:
        metrics, plan = _train(ctx, ctx.work / "llama", [*size, "checkpoint.at_end=false"])
    finally:
        launch_dist.shutdown()
    last = metrics[-1]
    predicted = plan["estimate"]["memory"]["total"]
    if not all(map(lambda m: m["loss"] == m["loss"], metrics)):
        raise RuntimeError(f"a loss is NaN: {[m['loss'] for m in metrics]}")
    return {"n_params": plan.get("n_params"), "tokens_per_s": last["tokens_per_s"], "mfu": last["mfu"],
            "peak_gib": last["peak_mem_bytes"] / 2**30, "predicted_gib": predicted / 2**30,
            "peak_vs_predicted": last["peak_mem_bytes"] / predicted}


def _fake_world(world: int) -> None:
    """Rank 0 of `world` over torch's fake process group (collectives return at once, data is not
    exchanged): one rank's memory of a large layout on one device. torch 2.13 registers the "fake"
    backend only when its testing module is imported (init_process_group("fake") without it
    fails with "Unknown c10d backend type FAKE"), so the private module is the one route."""
    import torch.distributed as dist

    try:
        from torch.testing._internal.distributed.fake_pg import FakeStore
    except ImportError as e:
        raise Skip(f"torch {torch.__version__} has no fake process group ({e})") from None
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)


def _fake_layout(ctx: Ctx, name: str, parallel: list[str]) -> dict[str, Any]:
    """One training step of rank 0 of an 8-rank layout over the fake process group: its peak
    memory beside the prediction. The fake collectives and receives exchange no data, so the loss
    and gradient norm are garbage (often inf): the non-finite guard (axon/nonfinite.py) is told to
    let the step update anyway, so the optimizer's states are allocated and measured."""
    from unittest import mock

    import torch.distributed as dist

    from axon.nonfinite import NonFiniteGuard

    size = (["train.global_batch_size=16", "train.seq_len=64"] if ctx.cpu else
            [*SMALL_LLAMA, "train.global_batch_size=32", "train.seq_len=2048"])
    _fake_world(8)
    try:
        if not ctx.cpu:
            torch.cuda.reset_peak_memory_stats(ctx.device)
        with mock.patch.object(NonFiniteGuard, "allows", lambda *args: True):
            metrics, plan = _train(ctx, ctx.work / name, [*size, *parallel, "train.steps=1",
                                                         "checkpoint.at_end=false", "optim.grad_clip=0"], world=8)
    finally:
        dist.destroy_process_group()
    predicted = plan["estimate"]["memory"]["total"]
    peak = metrics[-1]["peak_mem_bytes"]
    return {"peak_gib": peak / 2**30, "predicted_gib": predicted / 2**30, "peak_vs_predicted": peak / predicted,
            "note": "loss meaningless (fake collectives)"}


def fake_zero3_dp8(ctx: Ctx) -> dict[str, Any]:
    return _fake_layout(ctx, "zero3", ["parallel.dp=8", "parallel.zero=3"])


def fake_pp4_1f1b(ctx: Ctx) -> dict[str, Any]:
    return _fake_layout(ctx, "pp4", ["parallel.pp=4", "parallel.dp=2", "parallel.schedule=1f1b",
                                     "parallel.micro_batch_size=1"])
