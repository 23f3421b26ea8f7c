"""Schedule bubbles and peak activations: closed forms, and the simulator's tables."""
import json

import pytest

from perfmodel import pipeline
from perfmodel.pipeline import ScheduleCost, closed_form, schedule_cost


@pytest.mark.parametrize("sched,v,bubble,peak", [
    ("gpipe", 1, 3 / 11, 8.0),  # (p-1)/(m+p-1), all m microbatches in flight
    ("1f1b", 1, 3 / 11, 4.0),  # first stage holds min(m, p)
    ("interleaved", 2, 3 / 19, 4 * (1 + 3 / 8)),  # (p-1)/(vm+p-1), x(1 + (p-1)/(pv))
    ("zbh1", 1, 1 / 9, 4.0),  # a third of 1F1B's idle time
    ("zbv", 2, 0.0, 4.0),  # zero bubble once m >= 2p, 1F1B memory
    ("vhalf", 2, 1.5 / 9.5, 3.0),  # half the idle time, floor((p+2)/2)
    ("vmin", 2, 2 / 10, 2.0),  # two thirds of the idle time, floor((p+4)/3)
])
def test_closed_forms(sched, v, bubble, peak):
    cost = closed_form(sched, pp=4, m=8, v=v)
    assert cost.bubble_fraction == pytest.approx(bubble)
    assert cost.peak_activations == pytest.approx(peak)


def test_no_pipeline_no_bubble():
    assert closed_form("1f1b", 1, 8) == ScheduleCost(0.0, 1.0, "closed-form")


def test_table_entries_win(tmp_path):
    path = tmp_path / "tables.json"
    path.write_text(json.dumps({"version": 1, "entries": [
        {"schedule": "1f1b", "pp": 4, "microbatches": 8, "virtual_stages": 1, "bubble_fraction": 0.3,
         "peak_activations": [4.0, 3.0, 2.0, 1.0]}]}))
    table = pipeline.tables(path)
    assert schedule_cost("1f1b", 4, 8, 1, table) == ScheduleCost(0.3, 4.0, "table")
    assert schedule_cost("1f1b", 4, 16, 1, table).source == "closed-form"
    path.write_text("{")
    with pytest.raises(ValueError, match="regenerate"):
        pipeline.tables(path)


def test_virtual_stage_rules():
    assert pipeline.valid_virtual_stages("zbv", 2) is None
    assert "virtual_stages=2" in pipeline.valid_virtual_stages("vhalf", 3)
    assert "virtual_stages >= 2" in pipeline.valid_virtual_stages("interleaved", 1)
    assert pipeline.p2p_per_microbatch("interleaved", 4) == 4 and pipeline.p2p_per_microbatch("vmin", 2) == 2


def test_closed_forms_agree_with_the_simulator():
    """The cross-check of DESIGN.md section 5: where the closed forms are exact (GPipe, 1F1B,
    interleaved with m a multiple of p) and for every schedule's peak memory, they match the tables."""
    table = pipeline.tables()
    if not table:
        pytest.skip("perfmodel/schedule_tables.json not generated")
    checked = 0
    for (sched, p, m, v), entry in table.items():
        if p == 1 or sched not in ("gpipe", "1f1b", "interleaved", "zbh1", "zbv", "vhalf", "vmin"):
            continue
        if pipeline.valid_virtual_stages(sched, v) is not None or m < p:
            continue
        ours = closed_form(sched, p, m, v)
        if sched in ("gpipe", "1f1b") or (sched == "interleaved" and m % p == 0):
            assert entry.bubble_fraction == pytest.approx(ours.bubble_fraction, abs=1e-3), (sched, p, m, v)
        assert entry.peak_activations == pytest.approx(ours.peak_activations, abs=1e-6), (sched, p, m, v)
        checked += 1
    assert checked > 0
