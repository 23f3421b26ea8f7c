"""perfmodel/validation.py (what benchmarks/perfmodel_validate.py measures and how it scores):
the rank correlation, the headline scores, the confirmation's choices, and the plan set (every
layout of 8 ranks the build can run appears, each plan passes the trainer's checks)."""
import itertools
import math

import pytest

from axon.config import freeze, load
from perfmodel import validation as pv
from perfmodel.specs import AXES, Cluster, ModelSpec, Plan


def test_spearman_hand_computed():
    assert pv.spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(0.8)  # 1 - 6 * 4 / (5 * 24)
    assert pv.spearman([1, 2, 3], [10, 100, 1000]) == pytest.approx(1.0)  # ranks, not values
    assert pv.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert pv.ranks([5.0, 1.0, 5.0, 2.0]) == [2.5, 0.0, 2.5, 1.0]  # ties share the average rank


def test_headline_scores():
    rows = [{"name": n, "pred_s": p, "meas_s": m, "pred_mem": pm, "meas_mem": 100.0} for n, p, m, pm in
            (("a", 0.5, 0.9, 105.0), ("b", 0.6, 0.6, 80.0), ("c", 0.7, 0.8, 100.0), ("d", 0.8, 1.2, 130.0))]
    h = pv.headline(rows)
    assert h["spearman"] == pytest.approx(pv.spearman([0.5, 0.6, 0.7, 0.8], [0.9, 0.6, 0.8, 1.2]))
    assert h["best_ratio"] == pytest.approx(0.9 / 0.6)  # the predicted best "a" against the fastest "b"
    assert h["mem_within_10pct"] == pytest.approx(0.5)  # a (5%) and c (0%); b (20%) and d (30%) are not
    assert h["mem_median_err"] == pytest.approx(0.125) and h["mem_worst_err"] == pytest.approx(0.3)


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


def test_plan_set_covers_every_runnable_layout(tmp_path):
    cfg = freeze(load(["model=tiny", "cluster=local-cpu", f"run.dir={tmp_path}"]))
    sweep = pv.Sweep(cfg.model, cfg.cluster, 8, cfg.train.global_batch_size, cfg.train.seq_len)
    plans, rejected = pv.candidate_plans(sweep, quick=False)
    assert all(p.world_size == 8 and sweep.why_not(p) is None for p in plans)
    assert len(set(plans)) == len(plans) and rejected > 0
    covered = {tuple(p.degrees().values()) for p in plans}
    layouts = 0
    for degs in itertools.product(range(1, 9), repeat=len(AXES)):
        if math.prod(degs) != 8:
            continue
        layouts += 1
        deg = dict(zip(AXES, degs))
        runnable = any(sweep.why_not(p) is None
                       for p in pv.variants(deg, cfg.model.n_layers, cfg.train.global_batch_size))
        assert (degs in covered) == runnable, deg
    assert layouts == len(pv.layouts(8)) and len(covered) > 1
    quick, _ = pv.candidate_plans(sweep, quick=True)
    assert set(quick) <= set(plans) and len(quick) == 2 * len(pv.QUICK)


def test_why_not_names_the_setting():
    sweep = pv.Sweep(ModelSpec(), Cluster(), 8, 16, 128)  # 8 layers, 4 heads
    assert sweep.why_not(Plan(dp=8)) is None
    assert "parallel.dp" in sweep.why_not(Plan(dp=4))  # 4 ranks of 8
    assert "parallel.tp_col" in sweep.why_not(Plan(tp_col=8))  # 4 heads over 8 ranks
    assert "parallel.virtual_stages" in sweep.why_not(Plan(pp=8, schedule="zbv", virtual_stages=2))
