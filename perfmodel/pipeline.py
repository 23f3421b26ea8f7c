"""Pipeline schedules: bubble fraction and peak in-flight activations.

Closed forms (docs/architecture.md, Formulas; the zero-bubble and controllable-memory papers), with
F = B = W for the zero-bubble family. The bubble fraction is bubble time / total pipeline time.
Peak activations are in units of one microbatch's activations of one whole pipeline stage (all
its layers, all its virtual chunks), on the rank that holds the most and on the rank that holds
the head (which also keeps the logits).

Within `SIMULATED_PP` stages and `SIMULATED_MICROBATCHES` microbatches the numbers come from
simulating the very action lists the runtime executes (perfmodel/schedules.py built,
perfmodel/schedule_sim.py simulated, memoized), except for GPipe, 1F1B and interleaved (`EXACT`),
whose closed forms equal that simulation; beyond, from the closed forms, except the bubble
of the schedules whose closed form is an idealisation the runtime's lists do not reach (the
zero-bubble and V families: zbv's closed form says no bubble once m >= 2p, its simulated lists keep
0.17-0.21 microbatch slots idle per stage boundary), which is carried over from the simulation at
the range's edge (`extrapolated_bubble`), so a layout does not win by leaving the simulated range.

Activation offload (PipeOffload, `parallel.offload.activations`): the device and host units come
from the runtime's own offload plan (perfmodel/schedules.py `_offload_plan`: by chunk and
microbatch, each offloaded pair back on the device from its RELOAD, RELOAD_LEAD compute actions
ahead of its backward), simulated; beyond the simulated range a closed form keeps the running
chunk and RELOAD_LEAD reloaded ones and offloads the fraction of the rest.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import lru_cache

from perfmodel.schedules import RELOAD_LEAD, V_SHAPED, W, Action, chunks_per_rank, compute_orders, with_offloads
from perfmodel.schedule_sim import held_peaks, simulate

SIMULATED_PP = 16  # simulate schedules up to this many stages ...
SIMULATED_MICROBATCHES = 64  # ... and this many microbatches per step


@dataclass(frozen=True)
class ScheduleCost:
    bubble_fraction: float
    peak_activations: float  # stage-microbatch units on the device, max over ranks
    source: str  # "simulated", "closed-form", or "extrapolated" (closed form, bubble from the simulation's edge)
    head_activations: float = 1.0  # device units on the rank holding the last chunk (the head; rank 0 in a V)
    offloaded: float = 0.0  # units in host memory (activation offload), max over ranks
    head_logits: float = 1.0  # microbatches whose logits the head's rank holds at once (gpipe: every one)


def _fraction(idle_units: float, m: int) -> float:
    """Bubble fraction when `idle_units` microbatch-slots of idle time precede m busy ones."""
    return idle_units / (m + idle_units) if idle_units > 0 else 0.0


def _v(bubble: float, peak: float) -> ScheduleCost:
    """A V-shaped schedule: the last chunk (the head) is on rank 0, the most loaded one."""
    return ScheduleCost(bubble, peak, "closed-form", peak)


def closed_form(schedule: str, pp: int, m: int, v: int = 1) -> ScheduleCost:
    """Bubble and peak activations of `schedule` on pp stages, m microbatches, v chunks/rank."""
    if pp == 1:
        return ScheduleCost(0.0, 1.0, "closed-form")
    p = pp
    if schedule == "gpipe":  # all forwards, then all backwards
        return ScheduleCost(_fraction(p - 1, m), float(m), "closed-form", float(m), head_logits=float(m))
    if schedule == "1f1b":  # the last stage runs each backward right after its forward
        return ScheduleCost(_fraction(p - 1, m), float(min(m, p)), "closed-form")
    if schedule == "interleaved":  # (p-1)/(vm+p-1); the first rank warms up 2(p-1) + (v-1)p chunks,
        # so p(1 + (p-1)/(pv)) stages of activations (Korthikanti), capped by the m*v chunks there are;
        # the last rank warms up (v-1)p chunks
        return ScheduleCost(_fraction((p - 1) / v, m), min(m * v, 2 * (p - 1) + (v - 1) * p + 1) / v, "closed-form",
                            min(m * v, (v - 1) * p + 1) / v)
    if schedule == "zbh1":  # B and W split: bubble (p-1)(F+B-W) = a third of 1F1B's; the last stage
        # defers its Ws into the cool-down, so it too holds up to p microbatches (each until its W)
        return ScheduleCost(_fraction((p - 1) / 3, m), float(min(m, p)), "closed-form", float(min(m, p)))
    if schedule == "zbv":  # near-zero bubble once the V is full, 1F1B memory; the head is on rank 0
        idle = 0.0 if m >= 2 * p else (p - 1) / 2
        return _v(_fraction(idle, m), float(min(m, p)))
    if schedule == "vhalf":  # half 1F1B's bubble and activations
        return _v(_fraction((p - 1) / 2, m), float(min(m, (p + 2) // 2)))
    if schedule == "vmin":  # two thirds of 1F1B's bubble, a third of its activations
        return _v(_fraction(2 * (p - 1) / 3, m), float(min(m, (p + 4) // 3)))
    raise ValueError(f"parallel.schedule={schedule!r} has no cost model")


@lru_cache(maxsize=4096)
def simulated(schedule: str, pp: int, m: int, v: int = 1, offload: float = 0.0) -> ScheduleCost:
    """Bubble and peak activations of the runtime's own action lists, simulated (unit costs; the
    compute actions alone: messages take no time and offload time is priced apart). With
    `offload`, the device and host peaks of the list with the runtime's offloads and reloads."""
    if offload > 0:
        orders = with_offloads(run_orders(schedule, pp, m, v), offload)
        split = any(a.kind == W for a in orders[0])
        held = [held_peaks(acts, split, 1 / chunks_per_rank(schedule, v)) for acts in orders]
        peaks, host = [h[0] for h in held], max(h[1] for h in held)
        bubble = schedule_cost(schedule, pp, m, v).bubble_fraction  # offload time is priced apart
    else:
        result = simulate(run_orders(schedule, pp, m, v))
        peaks, host, bubble = list(result.peak_activations), 0.0, result.bubble_fraction
    head = peaks[0] if schedule in V_SHAPED else peaks[-1]
    return ScheduleCost(bubble, float(max(peaks)), "simulated", float(head), float(host), _head_logits(schedule, m))


@lru_cache(maxsize=1024)
def run_orders(schedule: str, pp: int, m: int, v: int) -> list[list[Action]]:
    """perfmodel/schedules.py `compute_orders`, memoized (read only: simulate and with_offloads copy)."""
    return compute_orders(schedule, pp, m, v)


def _head_logits(schedule: str, m: int) -> float:
    return float(m) if schedule == "gpipe" else 1.0  # gpipe: every forward before any backward


def offloaded_closed_form(cost: ScheduleCost, schedule: str, v: int, offload: float) -> ScheduleCost:
    """`cost` (no offload) with a fraction `offload` of what a rank holds beyond its running chunk
    and the RELOAD_LEAD chunks reloaded ahead of their backward moved to the host."""
    chunk = 1.0 / chunks_per_rank(schedule, v)  # one chunk of one microbatch, in stage units

    def split(units: float) -> tuple[float, float]:
        kept = min(units, (1 + RELOAD_LEAD) * chunk)
        return units - offload * (units - kept), offload * (units - kept)

    (peak, host), (head, _) = split(cost.peak_activations), split(cost.head_activations)
    return ScheduleCost(cost.bubble_fraction, peak, cost.source, head, host, cost.head_logits)


@lru_cache(maxsize=65536)
def schedule_cost(schedule: str, pp: int, m: int, v: int = 1, offload: float = 0.0) -> ScheduleCost:
    """The simulated cost within the simulated range, else the closed form; `offload`: the
    fraction of activations offloaded (parallel.offload.activations; ignored at pp = 1). EXACT
    schedules without offload take their closed form everywhere (it is their simulated cost)."""
    offload = offload if pp > 1 else 0.0
    if pp <= SIMULATED_PP and m <= SIMULATED_MICROBATCHES and (offload > 0 or schedule not in EXACT):
        return simulated(schedule, pp, m, v, offload)
    cost = closed_form(schedule, pp, m, v)
    if pp > 1 and schedule not in EXACT:
        cost = replace(cost, bubble_fraction=extrapolated_bubble(schedule, pp, m, v), source="extrapolated")
    return offloaded_closed_form(cost, schedule, v, offload) if offload > 0 else cost


# schedules whose closed form equals the simulation of their lists (bubble, peak and head activations)
# wherever the rules allow them within the simulated range (checked over all of it when written:
# 2,361 (schedule, pp, m, v); tests/unit/test_perfmodel_pipeline.py samples it)
EXACT = ("gpipe", "1f1b", "interleaved")


@lru_cache(maxsize=65536)
def extrapolated_bubble(schedule: str, pp: int, m: int, v: int = 1) -> float:
    """The bubble of `schedule` on pp stages and m microbatches beyond the simulated range: the
    idle microbatch slots per stage boundary simulated at the range's edge (min(pp,
    SIMULATED_PP) stages, about the same microbatches per stage: the nearest power of two, at most
    SIMULATED_MICROBATCHES, so the search simulates a handful of edge points), carried to pp - 1
    boundaries."""
    p_e = min(pp, SIMULATED_PP)
    m_e = min(2 ** max(0, round(math.log2(m * p_e / pp))), SIMULATED_MICROBATCHES)
    f = simulated(schedule, p_e, m_e, v).bubble_fraction
    idle = f * m_e / (1 - f) * (pp - 1) / (p_e - 1)  # slots: f = idle / (m + idle)
    return _fraction(idle, m)


@lru_cache(maxsize=65536)
def bubble_bound(schedule: str, pp: int, m: int, v: int = 1) -> float:
    """A lower bound of `schedule_cost(...).bubble_fraction` that never simulates. For EXACT the
    closed form, which is the simulated value at every pp <= SIMULATED_PP and m <=
    SIMULATED_MICROBATCHES the rules allow (checked over the whole range when written;
    tests/unit/test_perfmodel_pipeline.py samples it). Otherwise every rank has 3m units of work
    (F + B, or F + B + W, of a full stage per microbatch) and the last rank's first input arrives
    only after pp - 1 chunk forwards of 1/chunks each, so the step takes at least 3m + (pp - 1)/chunks:
    (pp - 1)/(3 chunks) idle microbatch slots. Beyond the simulated range it bounds the extrapolated
    bubble too: that carries the edge's simulated idle slots per stage boundary, at least this
    bound's, to pp - 1 boundaries. Shaded by 1e-9 so that rounding never lifts it above the bubble."""
    if schedule in EXACT:
        return closed_form(schedule, pp, m, v).bubble_fraction * (1 - 1e-9)
    delay = (pp - 1) / chunks_per_rank(schedule, v)
    return delay / (3 * m + delay) * (1 - 1e-9)


@lru_cache(maxsize=65536)
def bubble_floor(schedule: str, pp: int, m: int, v: int = 1) -> float:
    """`bubble_bound`, tightened to the bubble itself beyond the simulated range, where the
    zero-bubble and V families' bubble is extrapolated from a few simulations at the range's edge
    (`extrapolated_bubble`, shared by every pp and m that round to the same edge point)."""
    if schedule not in EXACT and (pp > SIMULATED_PP or m > SIMULATED_MICROBATCHES):
        return schedule_cost(schedule, pp, m, v).bubble_fraction * (1 - 1e-9)
    return bubble_bound(schedule, pp, m, v)


def p2p_per_microbatch(schedule: str, v: int) -> int:
    """Activation sends per rank per microbatch in each direction (one per chunk boundary)."""
    return 2 if schedule in V_SHAPED else max(1, v)
