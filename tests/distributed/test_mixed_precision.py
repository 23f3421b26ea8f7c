"""train.dtype=bf16 on CPU (gloo): fp32 master weights and Adam states, bf16 compute weights made
once per step (parallel/precision.py), fp32 gradients. Every layout's loss curve stays within a
bf16 tolerance of a single-process fp32 run, and the saved activations halve.

Tolerance: bf16 keeps 8 significant bits (relative rounding up to 2^-9, 0.2%, per value); the
bf16 matmuls, residual stream and per-microbatch weight gradients move the step-1 loss by 0.004%
(measured), and 5 AdamW steps (lr 3e-3) on the tiny model carry the difference to at most 0.04%
(measured: 0.022% data/pipeline parallel, 0.028% ring, 0.031% tp2, 0.038% tp3d-sp). TOL = 0.5% leaves a
13x margin; the loss falls by 1.56
over these steps, so the last check (it learns) catches compute weights that do not follow the
updates, and a compute weight one update behind moves the step-2 loss by 9%.
"""
from __future__ import annotations

import json

import pytest

from tests.distributed.trainer_driver import make_cfg, train

TOL = 0.005
STEPS = ["train.steps=5", "model.n_layers=4", "optim.grad_clip=1.0"]
LAYOUTS = {
    "dp2": (["parallel.dp=2"], 2),
    "zero1": (["parallel.dp=2", "parallel.zero=1"], 2),
    "zero2": (["parallel.dp=2", "parallel.zero=2"], 2),
    "zero3": (["parallel.dp=2", "parallel.zero=3"], 2),
    "pp2-1f1b": (["parallel.pp=2", "parallel.schedule=1f1b"], 2),
    "pp2-interleaved": (["parallel.pp=2", "parallel.schedule=interleaved", "parallel.virtual_stages=2"], 2),
    # the compute weights under recomputation (ZeRO-3 regathers inside backward), PipeOffload
    # (weights are not offloaded), the split backward (W reaches the masters through them), TP
    "zero3-recompute": (["parallel.dp=2", "parallel.zero=3", "parallel.recompute=full"], 2),
    "pp2-offload": (["parallel.pp=2", "parallel.schedule=1f1b", "parallel.offload.activations=1.0"], 2),
    "pp2-zbv": (["parallel.pp=2", "parallel.schedule=zbv", "parallel.virtual_stages=2"], 2),
    "tp2": (["parallel.tp_col=2"], 2),
    "tp3d-sp": (["parallel.tp_col=2", "parallel.tp_depth=2", "parallel.sequence_parallel=true"], 4),
    "cp2-ring": (["parallel.cp=2"], 2),
    "cp2-ulysses": (["parallel.cp=2", "parallel.cp_mode=ulysses"], 2),
}


@pytest.fixture(scope="module")
def fp32(tmp_path_factory, dist_pools):
    """The single-process fp32 losses."""
    return dist_pools.run(1, train, make_cfg(tmp_path_factory.mktemp("fp32"), "ref", "train.dtype=fp32",
                                             *STEPS))[0][1]


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_bf16_losses_track_fp32(fp32, name, tmp_path, dist_pools):
    layout, world = LAYOUTS[name]
    got = dist_pools.run(world, train, make_cfg(tmp_path, "run", "train.dtype=bf16", *layout, *STEPS))[0][1]
    assert len(got) == len(fp32)
    assert got != fp32  # bf16 really ran
    rel = [abs(g - f) / f for g, f in zip(got, fp32)]
    assert max(rel) <= TOL, (name, rel)
    assert got[-1] < got[0] - 0.5  # and it learns


def _activations(tmp_path, dist_pools, layout: list[str], world: int, dtype: str) -> int:
    cfg = make_cfg(tmp_path, dtype, f"train.dtype={dtype}", "train.steps=1", "model.d_model=256",
                   "train.seq_len=64", *layout)
    dist_pools.run(world, train, cfg)
    return json.loads((cfg.run_dir / "plan.json").read_text())["memory"]["measured"]["activations"]


@pytest.mark.parametrize("name", ["zero3", "pp2-1f1b"])
def test_bf16_halves_activations(name, tmp_path, dist_pools):
    """Rank 0's saved activations (the pipeline's ActivationStore: compute weights are not
    activations) under bf16 are at most 0.55x fp32's; autocast alone made them grow (a bf16 copy of
    every weight saved per microbatch)."""
    layout, world = LAYOUTS[name]
    fp32 = _activations(tmp_path, dist_pools, layout, world, "fp32")
    bf16 = _activations(tmp_path, dist_pools, layout, world, "bf16")
    assert bf16 <= 0.55 * fp32, (bf16, fp32)


@pytest.mark.parametrize("name", ["dp2", "zero2", "zero3"])
def test_bf16_resume_equals_straight_run(name, tmp_path, dist_pools):
    """A checkpoint holds the fp32 masters (ZeRO: each rank's shard, the only fp32 copy from stage 1);
    on load the engine refreshes (stages 1-2: gathers) the bf16 compute weights, so a resumed run
    continues exactly as the uninterrupted one."""
    layout, world = LAYOUTS[name]
    common = ["train.dtype=bf16", *layout, "train.steps=4"]
    straight = dist_pools.run(world, train, make_cfg(tmp_path, "straight", *common))[0][1]
    dist_pools.run(world, train, make_cfg(tmp_path, "resumed", *common[:-1], "train.steps=2",
                                          "checkpoint.at_end=true"))
    start, rest = dist_pools.run(world, train, make_cfg(tmp_path, "resumed", *common))[0]
    assert start == 2
    assert rest == straight[2:]
