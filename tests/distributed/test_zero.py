"""ZeRO 1/2/3 and optimizer offload train exactly like plain data parallelism (the data-parallel
engine: DataParallel + torch AdamW) over 10 steps with gradient accumulation; ZeRO-3 composes with
recomputation; reductions really launch during backward."""
from __future__ import annotations

import pytest

from perfmodel.specs import Offload, Plan
from tests.distributed import zero_driver as drv


def train_variants(variants: list[Plan], steps: int) -> list[list[float]]:
    """Losses of each plan's engine (`grad_engine.build`: data parallelism at zero=0 without offload)."""
    return [drv.train(plan, steps) for plan in variants]


def _check(results: list[list[list[float]]], n_variants: int) -> None:
    per_rank = results
    for rank_losses in per_rank:  # every rank reports the same all-reduced loss
        assert rank_losses == per_rank[0]
    ref = per_rank[0][0]
    assert ref[-1] < ref[0]
    for got in per_rank[0][1:n_variants]:
        assert got == pytest.approx(ref, rel=1e-5)


@pytest.mark.parametrize("dp,mbs", [(2, 2), (4, 1)])
def test_zero_stages_match_data_parallel(dist_pools, dp, mbs):
    base = Plan(dp=dp, micro_batch_size=mbs)  # local batch 8/dp -> 2 microbatches
    variants = [base] + [base.replace(zero=z) for z in (1, 2, 3)]
    _check(dist_pools.run(dp, train_variants, variants, 10), len(variants))


def test_offload_matches_no_offload(dist_pools):
    on = Offload(optimizer=True)
    base = Plan(dp=2, micro_batch_size=2)
    variants = [base, base.replace(offload=on), base.replace(zero=1, offload=on), base.replace(zero=3, offload=on)]
    _check(dist_pools.run(2, train_variants, variants, 10), len(variants))


def test_zero3_with_recompute_matches(dist_pools):
    base = Plan(dp=2, micro_batch_size=2)
    variants = [base, base.replace(zero=3, recompute="full"),
                base.replace(zero=3, recompute="selective", recompute_layers=1)]
    _check(dist_pools.run(2, train_variants, variants, 5), len(variants))


def stage_stats(plan: Plan) -> tuple[int, int, int]:
    model, engine, grid = drv.make(plan)
    drv.train_step(model, engine, grid, plan, 0)
    stats = engine.reset_stats()
    engine.remove()
    return stats.launched_in_backward, stats.gathers, len(engine.units)


def test_reductions_overlap_backward_and_stage3_gathers_per_use(dist_pools):
    plan = Plan(dp=2, zero=2, micro_batch_size=2)  # 2 microbatches: stage 2 reduces each backward
    launched, _, units = dist_pools.run(2, stage_stats, plan)[0]
    assert launched == 2 * units
    plan3 = plan.replace(zero=3)
    launched, gathers, units = dist_pools.run(2, stage_stats, plan3)[0]
    assert launched == 2 * units
    blocks = units - 1
    assert gathers == 2 * 2 * blocks + 1  # each Block: forward + backward, per microbatch; root once
