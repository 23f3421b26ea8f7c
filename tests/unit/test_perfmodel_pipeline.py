"""Schedule bubbles and peak activations: closed forms, and the simulator."""

import pytest

from perfmodel import pipeline
from perfmodel.pipeline import ScheduleCost, closed_form, schedule_cost
from tests.unit.schedule_grid import grid


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


def test_costs_are_simulated_within_range_and_closed_form_beyond():
    assert schedule_cost("zbh1", 4, 8).source == "simulated"
    assert schedule_cost("zbh1", 4, 8) == pipeline.simulated("zbh1", 4, 8, 1)
    assert schedule_cost("1f1b", 4, 8, 1, 0.5) == pipeline.simulated("1f1b", 4, 8, 1, 0.5)  # offload: simulated
    assert schedule_cost("1f1b", 4, 8).source == "closed-form"  # exact: the closed form is the simulation
    assert schedule_cost("1f1b", 4, pipeline.SIMULATED_MICROBATCHES + 4).source == "closed-form"
    assert schedule_cost("zbh1", pipeline.SIMULATED_PP * 2, 8).source == "extrapolated"


def test_p2p_per_microbatch():
    assert pipeline.p2p_per_microbatch("interleaved", 4) == 4 and pipeline.p2p_per_microbatch("vmin", 2) == 2


def test_closed_forms_agree_with_the_simulator():
    """For the EXACT schedules (GPipe, 1F1B, interleaved) the closed form is the simulation of the
    runtime's action lists in every field (what lets `schedule_cost` skip simulating them); for
    every schedule the peak memory matches."""
    checked = 0
    for sched, p, m, v in grid():
        entry, ours = pipeline.simulated(sched, p, m, v), closed_form(sched, p, m, v)
        if sched in pipeline.EXACT:
            assert (entry.bubble_fraction, entry.peak_activations, entry.head_activations, entry.offloaded,
                    entry.head_logits) == pytest.approx((ours.bubble_fraction, ours.peak_activations,
                                                         ours.head_activations, ours.offloaded, ours.head_logits),
                                                        rel=1e-12, abs=1e-12), (sched, p, m, v)
        elif m >= p:
            assert entry.peak_activations == pytest.approx(ours.peak_activations, abs=1e-6), (sched, p, m, v)
        checked += 1
    assert checked > 50


def test_bubble_floor_bounds_the_simulation_and_is_exact_where_the_closed_form_is():
    """The search skips simulating a schedule whose floor cannot win (`pipeline.bubble_floor`):
    the floor never exceeds the simulated bubble, and equals it for the closed-form-exact schedules."""
    for sched, p, m, v in grid():
        floor, entry = pipeline.bubble_floor(sched, p, m, v), pipeline.simulated(sched, p, m, v)
        assert pipeline.bubble_bound(sched, p, m, v) == floor  # within the range they are one bound
        assert floor <= entry.bubble_fraction, (sched, p, m, v)
        if sched in pipeline.EXACT:
            assert floor == pytest.approx(entry.bubble_fraction, rel=1e-8, abs=1e-12), (sched, p, m, v)


@pytest.mark.parametrize("sched,v", [("zbv", 2), ("vhalf", 2), ("vmin", 2), ("zbh1", 1)])
def test_bubbles_beyond_the_simulated_range_continue_the_simulation(sched, v):
    """The zero-bubble and V closed forms are idealisations the runtime's lists do not reach (zbv:
    no bubble once m >= 2p); beyond the simulated range their bubble carries the simulated idle
    slots per stage boundary over, so one more stage costs about what the simulation says and a
    layout cannot win by leaving the simulated range."""
    p = pipeline.SIMULATED_PP
    edge = pipeline.simulated(sched, p, 2 * p, v).bubble_fraction
    beyond = schedule_cost(sched, p + 1, 2 * (p + 1), v)
    assert beyond.source == "extrapolated"
    assert edge <= beyond.bubble_fraction < edge * 1.05  # one more boundary, the same slots per boundary
    assert schedule_cost(sched, 2 * p, 4 * p, v).bubble_fraction > 0.5 * edge
    if sched == "zbv":
        assert closed_form(sched, 2 * p, 4 * p, v).bubble_fraction == 0.0  # what it replaces
    for pp, m in ((2 * p, 4 * p), (p + 1, 2), (p + 1, 200), (4 * p, 64), (p, 3 * pipeline.SIMULATED_MICROBATCHES)):
        bubble = schedule_cost(sched, pp, m, v).bubble_fraction
        # the search's floors: bubble_floor (tight beyond the range) and bubble_bound (never simulates)
        bound, floor = pipeline.bubble_bound(sched, pp, m, v), pipeline.bubble_floor(sched, pp, m, v)
        assert bound <= bubble and floor <= bubble and bound <= floor + 1e-12, (pp, m)
