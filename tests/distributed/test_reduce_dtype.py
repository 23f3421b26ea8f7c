"""`parallel.reduce_dtype=bf16`: the data-parallel and ZeRO 0-3 gradient reductions move a bf16 copy
(half the bytes counted) and train within bf16 rounding of the fp32 reductions; a group of one rank
reduces nothing and rounds nothing (bit-identical losses)."""
from __future__ import annotations

import pytest

from perfmodel.specs import Offload, Plan
from tests.distributed import zero_driver as drv

STEPS = 4
VARIANTS = {"dp": dict(), "zero1": dict(zero=1), "zero2": dict(zero=2), "zero3": dict(zero=3),
            "offload": dict(offload=Offload(optimizer=True))}  # offload without ZeRO: the ZeRO engine's stage 0


def losses_and_bytes(dp: int, names: tuple[str, ...]) -> dict[str, tuple[list[float], int]]:
    """{variant/reduce dtype: (losses of STEPS steps, bytes reduced over them)} on this rank."""
    out = {}
    for name in names:
        kw = VARIANTS[name]
        for rd in ("fp32", "bf16"):
            plan = Plan(dp=dp, micro_batch_size=2, reduce_dtype=rd, **kw)
            model, engine, grid = drv.make(plan)
            try:
                losses = [drv.train_step(model, engine, grid, plan, s) for s in range(STEPS)]
                out[f"{name}/{rd}"] = (losses, engine.reset_stats().bytes_reduced)
            finally:
                engine.remove()
    return out


def test_bf16_reductions_move_half_and_track_fp32(dist_pools):
    got = dist_pools.run(2, losses_and_bytes, 2, tuple(VARIANTS))[0]
    for name in VARIANTS:
        (fp32, fp32_bytes), (bf16, bf16_bytes) = got[f"{name}/fp32"], got[f"{name}/bf16"]
        assert fp32_bytes > 0 and bf16_bytes * 2 == fp32_bytes, name
        assert bf16[0] == fp32[0], name  # the first loss precedes any reduction
        assert bf16 != fp32, name  # the rounded sums changed the updates...
        # ...by bf16 rounding of the gradients (relative 2^-8 per element) through 3 Adam steps
        assert bf16 == pytest.approx(fp32, rel=2e-3), name


def test_one_rank_rounds_nothing(dist_pools):
    names = ("dp", "zero3")
    got = dist_pools.run(1, losses_and_bytes, 1, names)[0]
    for name in names:
        assert got[f"{name}/bf16"] == got[f"{name}/fp32"], name
