"""benchmarks/perfmodel_validate.py without running it: the rank correlation, and the plan set
(every layout of 8 ranks the build can run appears, each plan passes the trainer's checks)."""
import itertools

import pytest

from benchmarks import perfmodel_validate as pv
from perfmodel.specs import AXES


def test_spearman_hand_computed():
    assert pv.spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(0.8)  # 1 - 6 * 4 / (5 * 24)
    assert pv.spearman([1, 2, 3], [10, 100, 1000]) == pytest.approx(1.0)  # ranks, not values
    assert pv.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert pv._ranks([5.0, 1.0, 5.0, 2.0]) == [2.5, 0.0, 2.5, 1.0]  # ties share the average rank


def test_plan_set_covers_every_runnable_layout(tmp_path):
    cfg = pv.base_config(tmp_path, [])
    plans, rejected = pv.candidate_plans(cfg, quick=False)
    assert all(p.world_size == pv.WORLD and pv.why_not(cfg, p) is None for p in plans)
    assert len(set(plans)) == len(plans) and rejected > 0
    covered = {tuple(p.degrees().values()) for p in plans}
    for degs in itertools.product(range(1, pv.WORLD + 1), repeat=len(AXES)):
        deg = dict(zip(AXES, degs))
        if pv._prod(degs) != pv.WORLD:
            continue
        runnable = any(pv.why_not(cfg, p) is None
                       for p in pv.variants(deg, cfg.model.n_layers, cfg.train.global_batch_size))
        assert (degs in covered) == runnable, deg
    quick, _ = pv.candidate_plans(cfg, quick=True)
    assert set(quick) <= set(plans) and len(quick) == 2 * len(pv.QUICK)


def test_confirmation_pairs_the_predicted_best_with_the_fastest():
    rows = [{"name": n, "pred_s": p, "meas_s": m} for n, p, m in
            (("a", 0.5, 0.9), ("b", 0.6, 0.7), ("c", 0.7, 0.8), ("d", 0.8, 1.0), ("e", 0.9, 0.75))]
    assert [r["name"] for r in pv.confirm_candidates(rows, top=3)] == ["a", "b", "e", "c"]
    assert [r["name"] for r in pv.confirm_candidates(rows, top=1)] == ["a", "b"]
    rows[1]["pred_s"] = 0.1  # the predicted best is also the fastest: listed once
    assert [r["name"] for r in pv.confirm_candidates(rows, top=2)] == ["b", "e"]
    ratio, best = pv.confirmed_ratio({"a": [1.0, 3.0, 1.2], "b": [1.0, 1.1, 0.9]}, "a")
    assert best == "b" and ratio == pytest.approx(1.2 / 1.0)
    assert pv.confirmed_ratio({"a": [1.0], "b": [2.0]}, "a") == (1.0, "a")
