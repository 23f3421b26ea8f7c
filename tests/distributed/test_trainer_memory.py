"""The trainer under the memory schedules (ZeRO 1-3, optimizer offload, recomputation) trains
exactly like plain data parallelism, and plan.json records measured memory beside the
prediction. (Engine-level parity at 1e-5 and the byte formulas: test_zero*.py, test_recompute.py.)"""
from __future__ import annotations

import json

import pytest

from tests.distributed.trainer_driver import STEPS, make_cfg, train


@pytest.fixture(scope="module")
def reference(tmp_path_factory, dist_pools):
    return dist_pools.run(2, train, make_cfg(tmp_path_factory.mktemp("ref"), "ref", "parallel.dp=2", *STEPS))[0][1]


@pytest.mark.parametrize("layout,world", [
    (["parallel.dp=2", "parallel.zero=1"], 2),
    (["parallel.dp=2", "parallel.zero=2", "parallel.recompute=selective"], 2),
    (["parallel.dp=2", "parallel.zero=3", "parallel.recompute=full", "parallel.micro_batch_size=2"], 2),
    (["parallel.dp=2", "parallel.offload.optimizer=true"], 2),
    (["parallel.dp=2", "parallel.pp=2", "parallel.zero=1"], 4),
], ids=lambda v: "-".join(x.split(".")[-1] for x in v) if isinstance(v, list) else str(v))
def test_memory_schedules_match_data_parallel(reference, layout, world, tmp_path, dist_pools):
    got = dist_pools.run(world, train, make_cfg(tmp_path, "run", *layout, *STEPS))[0][1]
    assert got == pytest.approx(reference, rel=1e-4)  # AdamW amplifies fp32 reduction-order noise


def test_plan_json_has_measured_and_predicted_memory(tmp_path, dist_pools):
    cfg = make_cfg(tmp_path, "m", "parallel.dp=2", "parallel.zero=3", "train.steps=1")
    dist_pools.run(2, train, cfg)
    mem = json.loads((cfg.run_dir / "plan.json").read_text())["memory"]
    for key in ("params", "grads", "optimizer", "activations"):
        assert mem["measured"][key] > 0
    from perfmodel.flops import n_params

    assert mem["measured"]["params"] < 4 * n_params(cfg.model)  # ZeRO-3 holds a shard, not the model


def test_zero_tp_model_state_bytes_match_formula(tmp_path, dist_pools):
    """Under TP the ZeRO engine shards each rank's tensor-parallel pieces: measured bytes equal
    perfmodel.memory.model_states for Psi / tp parameters over dp (fp32: 4-byte weights and
    gradients, K = 8); the norms replicated over the tensor group are within the 5%."""
    from perfmodel.memory import model_states, stage_params

    cfg = make_cfg(tmp_path, "mt", "parallel.tp_col=2", "parallel.dp=2", "parallel.zero=2", "train.steps=1")
    dist_pools.run(4, train, cfg)
    got = json.loads((cfg.run_dir / "plan.json").read_text())["memory"]["measured"]
    psi = stage_params(cfg.model, 1, cfg.train.seq_len) / 2
    want = dict(zip(("params", "grads", "optimizer"), model_states(psi, 2, 2, 4)))
    for role, value in want.items():
        assert got[role] == pytest.approx(value, rel=0.05), role
