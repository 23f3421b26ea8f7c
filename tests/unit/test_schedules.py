"""Pipeline schedules as data: the simulator reproduces docs/architecture.md, Formulas's pipeline figures,
every built schedule validates (including PipeOffload variants), and validation catches broken lists."""
import pytest

from perfmodel.schedule_sim import simulate, validate
from perfmodel.schedules import (B, F, RECV_B, SEND_F, V_SHAPED, W, Action, ScheduleError, build,
                                chunks_per_rank, placement)


def run(schedule, pp, m, v=None, offload=0.0):
    v = chunks_per_rank(schedule, 1) if v is None else v
    actions = build(schedule, pp, m, v, offload)
    validate(actions, pp, m, pp * chunks_per_rank(schedule, v))
    return actions, simulate(actions)


@pytest.mark.parametrize("pp,m", [(2, 1), (2, 5), (4, 3), (4, 8), (8, 16)])
def test_1f1b_bubble_and_first_stage_memory(pp, m):
    _, result = run("1f1b", pp, m)
    assert result.bubble_fraction == pytest.approx((pp - 1) / (m + pp - 1))
    assert result.peak_activations[0] == min(m, pp)
    assert result.step_time == pytest.approx(3 * (m + pp - 1))  # F=1, full B=2


@pytest.mark.parametrize("pp,m", [(2, 4), (4, 6)])
def test_gpipe_holds_every_microbatch(pp, m):
    _, result = run("gpipe", pp, m)
    assert result.peak_activations == (m,) * pp
    assert result.bubble_fraction == pytest.approx((pp - 1) / (m + pp - 1))


@pytest.mark.parametrize("pp,m,v", [(2, 4, 2), (4, 8, 2), (4, 16, 4), (8, 16, 2)])
def test_interleaved_bubble_and_memory_factor(pp, m, v):
    _, result = run("interleaved", pp, m, v)
    assert result.bubble_fraction == pytest.approx((pp - 1) / (v * m + pp - 1))
    assert result.peak_activations[0] == pytest.approx(pp * (1 + (pp - 1) / (pp * v)))


def test_interleaved_with_one_chunk_is_1f1b():
    assert build("interleaved", 4, 8, 1) == build("1f1b", 4, 8)


@pytest.mark.parametrize("pp", [4, 8, 16])
def test_v_half_and_v_min_memory(pp):
    m = 2 * pp
    one_f_one_b = run("1f1b", pp, m)[1]
    half, least = run("vhalf", pp, m)[1], run("vmin", pp, m)[1]
    assert max(half.peak_activations) <= (pp + 2) // 2
    assert max(least.peak_activations) <= (pp + 4) // 3
    if pp == 16:  # the budgets approach 1/2 and 1/3 of 1F1B's as pp grows
        assert max(half.peak_activations) / max(one_f_one_b.peak_activations) <= 0.57
        assert max(least.peak_activations) / max(one_f_one_b.peak_activations) <= 0.38
    assert half.bubble_fraction < one_f_one_b.bubble_fraction  # B/W split fills part of the bubble


@pytest.mark.parametrize("pp,m", [(4, 8), (8, 16), (8, 32)])
def test_zero_bubble_schedules(pp, m):
    one_f_one_b = run("1f1b", pp, m)[1]
    zbv, zbh1 = run("zbv", pp, m)[1], run("zbh1", pp, m)[1]
    assert zbv.bubble_fraction <= one_f_one_b.bubble_fraction / 3
    assert zbh1.bubble_fraction <= 0.65 * one_f_one_b.bubble_fraction
    assert max(zbv.peak_activations) <= pp and max(zbh1.peak_activations) <= pp


def test_v_placement_and_split_backward():
    assert placement("zbv", 3) == [0, 1, 2, 2, 1, 0]
    actions = build("vmin", 3, 6, 2)
    assert {a.chunk for a in actions[0] if a.kind == F} == {0, 5}
    assert sum(a.kind == W for a in actions[1]) == 2 * 6


@pytest.mark.parametrize("schedule", ["1f1b", "interleaved", "zbh1", "zbv", "vhalf", "vmin", "gpipe"])
@pytest.mark.parametrize("offload", [0.0, 0.5, 1.0])
def test_every_schedule_validates(schedule, offload):
    for pp, m in [(1, 3), (2, 2), (3, 6), (4, 4), (4, 12)]:
        v = 2 if schedule in V_SHAPED + ("interleaved",) else 1
        run(schedule, pp, m, v, offload)


def test_none_is_forward_then_backward_per_microbatch():
    actions, result = run("none", 1, 3)
    assert [str(a) for a in actions[0]] == ["F0.0", "B0.0", "F1.0", "B1.0", "F2.0", "B2.0"]
    assert result.bubble_fraction == 0 and result.peak_activations == (1,)


def test_offload_lowers_device_peak():
    base = run("1f1b", 4, 8)[1]
    half, full = run("1f1b", 4, 8, offload=0.5)[1], run("1f1b", 4, 8, offload=1.0)[1]
    assert full.peak_activations[0] < base.peak_activations[0]
    assert half.peak_activations[0] <= base.peak_activations[0]
    assert full.peak_offloaded[0] >= half.peak_offloaded[0] > 0 and base.peak_offloaded == (0,) * 4
    assert half.step_time == base.step_time  # copies are free by default (async streams) ...
    assert run("1f1b", 4, 8, offload=1.0)[1].step_time <= simulate(
        build("1f1b", 4, 8, offload=1.0), cost={"OFFLOAD": 0.5, "RELOAD": 0.5}).step_time  # ... unless costed


def test_p2p_latency_and_costs():
    actions = build("1f1b", 4, 8)
    # fill and drain each cross pp-1 links; a single rank never waits on the network
    assert simulate(actions, p2p=0.5).step_time >= simulate(actions).step_time + 2 * 3 * 0.5
    assert simulate(build("none", 1, 4), p2p=0.5).step_time == 4 * 3
    assert simulate(actions, cost={F: 1.0, B: 1.0}).step_time == pytest.approx(2 * (8 + 3))


@pytest.mark.parametrize("schedule,pp,m,v,setting", [
    ("interleaved", 4, 6, 2, "train.global_batch_size"),
    ("vhalf", 4, 8, 1, "parallel.virtual_stages"),
    ("1f1b", 4, 8, 2, "parallel.virtual_stages"),
    ("none", 2, 4, 1, "parallel.pp"),
    ("1f1b", 2, 0, 1, "parallel.micro_batch_size"),
    ("pipedream", 2, 4, 1, "parallel.schedule"),
])
def test_build_errors_name_the_setting(schedule, pp, m, v, setting):
    with pytest.raises(ScheduleError, match=setting):
        build(schedule, pp, m, v)


def corrupted(edit):
    actions = [list(acts) for acts in build("1f1b", 2, 3)]
    edit(actions)
    with pytest.raises(ScheduleError) as err:
        validate(actions, 2, 3, 2)
    return str(err.value)


def test_validate_catches_a_missing_backward():
    assert "lacks" in corrupted(lambda a: a[1].remove(Action(B, 1, 1)))


def test_validate_catches_a_receive_after_its_consumer():
    def late_recv(actions):
        recv = next(a for a in actions[0] if a.kind == RECV_B)
        actions[0].remove(recv)
        actions[0].append(recv)
    assert "precede" in corrupted(late_recv)


def test_validate_catches_messages_out_of_order():
    def swap_sends(actions):
        k = [i for i, a in enumerate(actions[0]) if a.kind == SEND_F]
        actions[0][k[0]], actions[0][k[1]] = actions[0][k[1]], actions[0][k[0]]
    assert "posting order" in corrupted(swap_sends) or "must follow" in corrupted(swap_sends)


def test_validate_catches_a_p2p_deadlock():
    def recv_first(actions):  # posting B's receive first blocks rank 0's stream before it sends F
        recv = next(a for a in actions[0] if a.kind == RECV_B)
        actions[0].remove(recv)
        actions[0].insert(0, recv)
    assert "deadlock" in corrupted(recv_first)


def test_validate_catches_a_circular_wait():
    def last_forward_first(actions):  # rank 1 waits for a forward that waits on rank 1's backward
        for act in (Action(F, 2, 1), Action("RECV_F", 2, 1, 0)):
            actions[1].remove(act)
            actions[1].insert(0, act)
    assert "circular" in corrupted(last_forward_first)
