"""Measured model-state bytes per rank (axon.memory, unique storages after a training step) equal
the ZeRO formulas of DESIGN.md section 4 within 5%, for dp in {2, 4, 8} and every stage.

The formulas are written for mixed precision (2-byte weights and gradients, K = 12 for the fp32
master + Adam m, v). These runs are fp32: weights and gradients take 4 bytes and the fp32
parameters are themselves the master weights, so K = 8 (m, v):
    stage 0: 4Psi + 4Psi + 8Psi;  1: 4Psi + 4Psi + 8Psi/d;  2: 4Psi + (4+8)Psi/d;  3: (4+4+8)Psi/d
(perfmodel.memory.model_states with dtype_bytes=4). With optimizer offload the device holds no
optimizer state and the host holds master + m + v + a gradient landing buffer: 16Psi/d."""
from __future__ import annotations

import pytest

from axon.memory import data_parallel_roles, model_state_bytes
from benchmarks import zero_driver as drv
from perfmodel.flops import n_params
from perfmodel.specs import Offload, Plan


def measure(plans: list[Plan]) -> list[dict[str, int]]:
    out = []
    for plan in plans:
        model, engine, grid = drv.make(plan, plan.zero > 0 or plan.offload.optimizer)
        drv.train_step(model, engine, grid, plan, 0)
        if isinstance(engine, drv.Plain):
            out.append(model_state_bytes(data_parallel_roles(model, engine.dp, engine.opt)))
        else:
            out.append(model_state_bytes(engine.state_tensors()))
        engine.remove()
    return out


def formula(zero: int, psi: int, d: int) -> dict[str, float]:
    return {"params": 4 * psi / (d if zero >= 3 else 1), "grads": 4 * psi / (d if zero >= 2 else 1),
            "optimizer": 8 * psi / (d if zero >= 1 else 1)}


@pytest.mark.parametrize("d", [2, 4, 8])
def test_model_state_bytes_match_zero_formulas(dist_pools, d):
    psi = n_params(drv.SPEC)
    plans = [Plan(dp=d, micro_batch_size=8 // d, zero=z) for z in (0, 1, 2, 3)]
    plans.append(Plan(dp=d, micro_batch_size=8 // d, zero=3, offload=Offload(optimizer=True)))
    results = dist_pools.run(d, measure, plans)
    for rank_results in results:
        for plan, got in zip(plans, rank_results):
            want = formula(plan.zero, psi, d)
            if plan.offload.optimizer:
                want["optimizer"] = 0
                want["host"] = 16 * psi / d
            for role, value in want.items():
                assert got.get(role, 0) == pytest.approx(value, rel=0.05, abs=64), (plan.zero, role)
            total = sum(want.values())
            assert sum(got.values()) == pytest.approx(total, rel=0.05)
