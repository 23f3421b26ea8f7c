"""Pipeline schedules as data: for every pipeline rank, the ordered list of actions it runs.

    actions = build("zbv", pp=4, microbatches=8, virtual_stages=2)
    for rank, acts in enumerate(actions): print(rank, " ".join(map(str, acts)))

Pure Python (no torch), so schedules can be printed, checked (`perfmodel.schedule_sim.validate`)
and costed (`perfmodel.schedule_sim.simulate`) anywhere; one executor runs any list.

Model chunks are numbered 0..n_chunks-1 in model order; `placement` says which rank holds each:
one chunk per rank (gpipe, 1f1b, zbh1), round-robin `c % pp` (interleaved, v chunks per rank),
or a V (zbv, vhalf, vmin: rank r holds chunks r and 2pp-1-r).

Execution contract (what `validate` checks):
- a rank runs its list in order; F/B/W are compute (B is the full backward when no W appears);
- a maximal run of consecutive SEND_*/RECV_* actions is one batch, posted together
  (batch_isend_irecv); batches of a rank complete in posting order (one communicator stream);
- the rank waits for a RECV just before the compute that consumes it; sends complete in the
  background and are waited for at the end of the step;
- p2p messages between two ranks are matched in posting order (no tags), so the SENDs from a
  to b appear in the same order as b's RECVs from a;
- OFFLOAD moves a (chunk, microbatch)'s saved activations to host memory after its F, RELOAD
  brings them back ahead of its B (asynchronous copies).

Restrictions: interleaved with virtual_stages > 1 needs microbatches % pp == 0 (Megatron's
grouping of pp microbatches per chunk round); V schedules need virtual_stages == 2; others 1.
"""
from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass
from itertools import accumulate
from operator import sub

F, B, W = "F", "B", "W"
SEND_F, RECV_F, SEND_B, RECV_B = "SEND_F", "RECV_F", "SEND_B", "RECV_B"
OFFLOAD, RELOAD = "OFFLOAD", "RELOAD"
COMPUTE = (F, B, W)
COMM = (SEND_F, RECV_F, SEND_B, RECV_B)
MEMORY = (OFFLOAD, RELOAD)
KINDS = COMPUTE + COMM + MEMORY

SCHEDULES = ("none", "gpipe", "1f1b", "interleaved", "zbh1", "zbv", "vhalf", "vmin")
SPLIT_BACKWARD = ("zbh1", "zbv", "vhalf", "vmin")  # B (input grads) and W (weight grads) apart
V_SHAPED = ("zbv", "vhalf", "vmin")
RELOAD_LEAD = 2  # a RELOAD is placed this many compute actions ahead of its B


class ScheduleError(ValueError):
    """A schedule that cannot be built or is broken; the message names the setting to change."""


@dataclass(frozen=True)
class Action:
    """One step of a rank's schedule. `chunk` is the model chunk (model order); `peer` is the
    other rank of a SEND/RECV. SEND_F/SEND_B carry the output/input-grad of `chunk`; RECV_F and
    RECV_B carry the input/output-grad of `chunk`."""

    kind: str
    microbatch: int
    chunk: int
    peer: int | None = None

    def __str__(self) -> str:
        peer = "" if self.peer is None else f"@{self.peer}"
        return f"{self.kind}{self.microbatch}.{self.chunk}{peer}"


def chunks_per_rank(schedule: str, virtual_stages: int = 1) -> int:
    if schedule == "interleaved":
        return virtual_stages
    return 2 if schedule in V_SHAPED else 1


def placement(schedule: str, pp: int, virtual_stages: int = 1) -> list[int]:
    """rank holding each model chunk, indexed by chunk."""
    n = pp * chunks_per_rank(schedule, virtual_stages)
    if schedule in V_SHAPED:
        return [c if c < pp else 2 * pp - 1 - c for c in range(n)]
    return [c % pp for c in range(n)]


def build(schedule: str, pp: int, microbatches: int, virtual_stages: int = 1,
          offload: float = 0.0) -> list[list[Action]]:
    """Per-rank ordered action lists for `schedule` (see the module docstring)."""
    check(schedule, pp, microbatches, virtual_stages, offload)
    orders = compute_orders(schedule, pp, microbatches, virtual_stages)
    reloads, offloads = _offload_plan(orders, offload)
    return _with_p2p(orders, placement(schedule, pp, virtual_stages), reloads, offloads)


def compute_orders(schedule: str, pp: int, m: int, virtual_stages: int = 1) -> list[list[Action]]:
    """Per-rank ordered F/B/W actions of `schedule`, before messages and offloads are inserted: all
    that timing and activation peaks depend on (SEND/RECV take no time; `build` checks the settings)."""
    if schedule in ("none", "gpipe"):
        return [[Action(F, i, r) for i in range(m)] + [Action(B, i, r) for i in range(m)]
                for r in range(pp)] if schedule == "gpipe" else [_interleaved_1f1b(0, 1, m, 1)]
    if schedule in ("1f1b", "interleaved"):
        v = virtual_stages if schedule == "interleaved" else 1
        return [_interleaved_1f1b(r, pp, m, v) for r in range(pp)]
    return _greedy_split(placement(schedule, pp, virtual_stages), pp, m, _memory_cap(schedule, pp))


def check(schedule: str, pp: int, m: int, v: int, offload: float) -> None:
    """Raise ScheduleError naming the setting when the schedule cannot run (p, m, v, offload);
    the rules are perfmodel/rules.py's."""
    from perfmodel import rules
    from perfmodel.specs import Offload, Plan

    plan = Plan(pp=max(pp, 1), schedule=schedule, virtual_stages=max(v, 1), offload=Offload(activations=offload))
    found = rules.setting_rules(plan) + rules.schedule_rules(plan, m)
    if pp < 1 or v < 1:
        found.insert(0, rules.Violation("parallel.pp", f"parallel.pp={pp} and parallel.virtual_stages={v} must be >= 1"))
    if found:
        raise ScheduleError("; ".join(v.message for v in found))


def _interleaved_1f1b(rank: int, pp: int, m: int, v: int) -> list[Action]:
    """Megatron's (interleaved) 1F1B for one rank: warm-up forwards, one-forward-one-backward
    steady state, cool-down backwards. v=1 is plain 1F1B; v chunks go round-robin (c = k*pp+rank)
    and microbatches run in groups of pp per chunk round."""
    total = m * v

    def chunk_mb(k: int, forward: bool) -> tuple[int, int]:
        if v == 1:  # plain 1F1B: one chunk, microbatches in order
            return rank, k
        group, within = divmod(k, pp * v)
        local, j = divmod(within, pp)
        if not forward:
            local = v - 1 - local
        return local * pp + rank, group * pp + j

    warmup = min(pp - rank - 1, m) if v == 1 else min((pp - rank - 1) * 2 + (v - 1) * pp, total)
    fwd = [Action(F, i, c) for c, i in (chunk_mb(k, True) for k in range(total))]
    bwd = [Action(B, i, c) for c, i in (chunk_mb(k, False) for k in range(total))]
    order = fwd[:warmup]
    for k in range(total - warmup):
        order += [fwd[warmup + k], bwd[k]]
    return order + bwd[total - warmup:]


def _memory_cap(schedule: str, pp: int) -> float:
    """Peak activations per rank (units of one microbatch through one full stage) the greedy
    zero-bubble scheduler may hold: 1F1B's first stage (pp) for zbh1/zbv; the V-Half and V-Min
    budgets of Qi et al., floor((pp+2)/2) and floor((pp+4)/3)."""
    return {"zbh1": pp, "zbv": pp, "vhalf": (pp + 2) // 2, "vmin": (pp + 4) // 3}[schedule]


def _idle(r: int, t: float, waits: list[float], turns: list[tuple[float, bool, int]]) -> tuple[float, bool]:
    """Rank r found nothing to run at t: (when it looks again, stalled). The other ranks with work
    left are the heap `turns`, the next to act on top: when one acts at t too, r stays at t,
    stalled (that rank may make something ready sooner); else r waits for its earliest candidate
    (`waits`: their ready times) or the next rank's turn."""
    if turns and turns[0][0] == t and not turns[0][1]:
        return t, True
    later = [w for w in waits if w < float("inf")] + [q[0] for q in turns if q[0] > t]
    if not later:
        raise ScheduleError(f"greedy schedule stuck on rank {r} (internal error)")
    return min(later), False


def _greedy_split(place: list[int], pp: int, m: int, cap: float) -> list[list[Action]]:
    """List-schedule F/B/W with unit costs (per full stage F=B=W=1) under a per-rank activation
    cap, the zero-bubble recipe: whenever a rank is free it runs a ready B (of the oldest
    microbatch, the later chunk first), else a ready F the cap allows (of a microbatch already on
    the rank before one entering it, the oldest first), else its oldest pending W (which fills what
    would be a bubble and frees memory).

    A microbatch enters a rank (F of its first chunk there) only if room for its later chunks
    there stays free afterwards; later chunks run in microbatch order, so the oldest admitted
    microbatch can always go on and the greedy cannot deadlock."""
    n, eps, inf = len(place), 1e-9, float("inf")
    unit = pp / n  # one chunk's share of a full stage
    owned = [[c for c in range(n) if place[c] == r] for r in range(pp)]
    enters = [c == min(owned[place[c]]) for c in range(n)]  # a microbatch's first chunk on its rank
    need = [unit * (len(owned[place[c]]) if enters[c] else 1) for c in range(n)]  # room an F must find
    f_end = [[inf] * m for _ in range(n)]  # [chunk][microbatch]: when its F ends
    b_end = [[inf] * m for _ in range(n)]
    f_ready = [[0.0] * m] + f_end[:-1]  # an F waits for the previous chunk's F (views: filled as they end)
    b_ready = [b_end[c + 1] for c in range(n - 1)] + [f_end[n - 1]]  # a B for the next chunk's B, the last for its F
    next_f, next_b = [0] * n, [0] * n
    w_queue: list[deque[tuple[int, int]]] = [deque() for _ in range(pp)]
    held = [0.0] * pp  # activations on the rank now (F start to W end)
    free = [0.0] * pp
    orders: list[list[Action]] = [[] for _ in range(pp)]
    remaining = [3 * m * len(owned[r]) for r in range(pp)]

    # the rank to act next: the earliest free, one that found nothing to run last, the lowest; only
    # the acting rank's entry changes, so a heap with one entry per rank with work left holds the order
    turns = [(0.0, False, r) for r in range(pp) if remaining[r]]
    while turns:
        _, _, r = heapq.heappop(turns)
        t, waits, pick = free[r], [], None
        for c in owned[r]:  # a ready B: (microbatch, -chunk) least
            i = next_b[c]
            if i < m:
                if b_ready[c][i] > t:
                    waits.append(b_ready[c][i])
                elif pick is None or (i, -c) < (pick[1], -pick[2]):
                    pick = (B, i, c)
        if pick is None:
            room = cap + eps - held[r]
            for c in owned[r]:  # a ready F the cap allows: (entering, microbatch, chunk) least
                i = next_f[c]
                if i < m and need[c] <= room:
                    if f_ready[c][i] > t:
                        waits.append(f_ready[c][i])
                    elif pick is None or (enters[c], i, c) < (enters[pick[2]], pick[1], pick[2]):
                        pick = (F, i, c)
        if pick is None and w_queue[r]:
            c, i = w_queue[r].popleft()
            pick = (W, i, c)
            held[r] -= unit
        if pick is None:
            free[r], stalled = _idle(r, t, waits, turns)
            heapq.heappush(turns, (free[r], stalled, r))
            continue
        kind, i, c = pick
        free[r] = t + unit
        if kind == B:
            next_b[c] += 1
            b_end[c][i] = free[r]
            w_queue[r].append((c, i))
        elif kind == F:
            next_f[c] += 1
            f_end[c][i] = free[r]
            held[r] += unit
        orders[r].append(Action(kind, i, c))
        remaining[r] -= 1
        if remaining[r]:
            heapq.heappush(turns, (free[r], False, r))
    return orders


def with_offloads(orders: list[list[Action]], fraction: float) -> list[list[Action]]:
    """The compute orders with the offload plan's OFFLOADs (after their F) and RELOADs (before the
    compute RELOAD_LEAD ahead of their B) in place and no messages: all that memory depends on
    (`build` places them the same way among its messages)."""
    reloads, offloads = _offload_plan(orders, fraction)
    return [[x for k, a in enumerate(order) for x in (*reloads[r].get(k, ()), a, *offloads[r].get(k, ()))]
            for r, order in enumerate(orders)]


def _offload_plan(orders: list[list[Action]], fraction: float
                  ) -> tuple[list[dict[int, list[Action]]], list[dict[int, list[Action]]]]:
    """PipeOffload: per rank, offload `fraction` of the (chunk, microbatch) activations, picked
    greedily to lower the peak: each pick is the pair that is off the device at the most instants
    where the rank holds its peak (ties: the longest-lived), so the warm-up microbatches that set
    1F1B's peak are taken first. An offloaded pair is on the device during its F and from its
    RELOAD (RELOAD_LEAD compute actions before its B) until it is freed (B, or W when split).
    Pairs whose F and B are within RELOAD_LEAD + 1 actions are never offloaded (no time to move
    the data out and back). Returns, per rank, RELOADs to put before and OFFLOADs to put after
    the compute action at each index."""
    reloads: list[dict[int, list[Action]]] = [{} for _ in orders]
    offloads: list[dict[int, list[Action]]] = [{} for _ in orders]
    if fraction <= 0.0:
        return reloads, offloads
    for r, order in enumerate(orders):
        at = {(a.kind, a.chunk, a.microbatch): k for k, a in enumerate(order)}
        pairs = {(a.chunk, a.microbatch): (k, at[(B, a.chunk, a.microbatch)],
                                           at.get((W, a.chunk, a.microbatch), at[(B, a.chunk, a.microbatch)]))
                 for k, a in enumerate(order) if a.kind == F}  # (F index, B index, freed index)
        for c, i in _offload_choice(pairs, len(order), int(fraction * len(pairs) + 0.5)):
            f, b, _ = pairs[(c, i)]
            offloads[r].setdefault(f, []).append(Action(OFFLOAD, i, c))
            reloads[r].setdefault(b - RELOAD_LEAD, []).append(Action(RELOAD, i, c))
    return reloads, offloads


def _offload_choice(pairs: dict[tuple[int, int], tuple[int, int, int]], n: int, count: int) -> list[tuple[int, int]]:
    """`count` of one rank's (chunk, microbatch) pairs (F index, B index, freed index; n actions) to
    offload, greedily: each pick is off the device at the most instants where the rank holds its
    peak (ties: the longest-lived, then the latest microbatch and chunk). The occupancy per action
    index is updated in place as pairs are picked; an offloaded pair leaves it strictly between
    its F and its RELOAD."""
    left = {key for key, (f, b, _) in pairs.items() if b - f > RELOAD_LEAD + 1}
    if count >= len(left):
        return sorted(left)  # every eligible pair: the greedy order would not change the plan
    change = [0] * (n + 1)  # pairs on the device at each action index: from F to freed, inclusive
    for f, _, free in pairs.values():
        change[f] += 1
        change[free + 1] -= 1
    occupancy = list(accumulate(change[:n]))
    # per eligible pair, in parallel lists: its off-device span [start, end) (from after its F to its
    # RELOAD), its life and its tie-break; the pick is unique (the tie-break names the pair), so the
    # lists' order does not matter. Gains are counted by C-level maps over `before`.
    keys = sorted(left)
    starts = [pairs[k][0] + 1 for k in keys]
    ends = [pairs[k][1] - RELOAD_LEAD for k in keys]
    lives = [pairs[k][1] - pairs[k][0] for k in keys]
    ties = [(-k[1], -k[0]) for k in keys]
    chosen: list[tuple[int, int]] = []
    while keys and len(chosen) < count:
        peak = max(occupancy)
        before = [0, *accumulate(map(peak.__eq__, occupancy))]  # before[t]: instants at the peak among 0..t-1
        gains = map(sub, map(before.__getitem__, ends), map(before.__getitem__, starts))
        j = max(zip(gains, lives, ties, range(len(keys))))[3]
        start, end = starts.pop(j), ends.pop(j)
        del lives[j], ties[j]
        chosen.append(keys.pop(j))
        occupancy[start:end] = [occ - 1 for occ in occupancy[start:end]]
    return chosen


def _inputs(kind: str, c: int, i: int, n: int) -> tuple[tuple[str, int, int], ...]:
    """The actions whose ends action `kind` of (chunk c, microbatch i) waits for, of n chunks: of F
    the previous chunk's F; of B its own F and the next chunk's B; of W its B; of OFFLOAD / RELOAD
    its F."""
    if kind == F:
        return ((F, c - 1, i),) if c > 0 else ()
    if kind == B:
        return ((F, c, i), (B, c + 1, i)) if c < n - 1 else ((F, c, i),)
    return ((B, c, i) if kind == W else (F, c, i),)


def timeline(actions: list[list[Action]], costs: dict[str, float], p2p: float = 0.0
             ) -> list[list[tuple[float, float, Action]]]:
    """Event-driven timing: an action starts when its rank is free and its inputs are done (+p2p
    when they come from another rank); it lasts costs[kind] * pp / n_chunks. SEND/RECV take no
    time of their own. Raises ScheduleError on a circular wait. Per rank: (start, end, action).

    A rank runs until an input is missing and then waits on that input; finishing an action wakes
    the rank waiting on it (each action is visited once)."""
    place = {a.chunk: r for r, acts in enumerate(actions) for a in acts if a.kind in COMPUTE}
    pp, n = len(actions), len(place)
    per_chunk = pp / n
    span = {kind: cost * per_chunk for kind, cost in costs.items()}
    end: dict[tuple[str, int, int], float] = {}
    waiting: dict[tuple[str, int, int], list[int]] = {}  # missing input -> the ranks stopped on it
    pos, free = [0] * pp, [0.0] * pp
    out: list[list[tuple[float, float, Action]]] = [[] for _ in range(pp)]

    ready = list(range(pp))
    while ready:
        r = ready.pop()
        acts, line, k, t = actions[r], out[r], pos[r], free[r]
        while k < len(acts):
            a = acts[k]
            kind, c, i = a.kind, a.chunk, a.microbatch
            if kind in COMM:
                k += 1
                continue
            start, missing = t, None
            for need in _inputs(kind, c, i, n):  # each starts the action no earlier than it ends (+p2p across ranks)
                done = end.get(need)
                if done is None:
                    missing = need
                    break
                if place[need[1]] != r:
                    done += p2p
                if done > start:
                    start = done
            if missing is not None:
                waiting.setdefault(missing, []).append(r)
                break
            t = start + span[kind]
            line.append((start, t, a))
            if kind in COMPUTE:
                end[(kind, c, i)] = t
                ready += waiting.pop((kind, c, i), ())
            k += 1
        pos[r], free[r] = k, t
    if any(pos[r] < len(actions[r]) for r in range(pp)):
        stuck = ", ".join(f"rank {r} at {actions[r][pos[r]]}" for r in range(pp) if pos[r] < len(actions[r]))
        raise ScheduleError(f"circular wait between ranks: {stuck}")
    return out


def _with_p2p(orders: list[list[Action]], place: list[int], reloads: list[dict[int, list[Action]]],
              offloads: list[dict[int, list[Action]]]) -> list[list[Action]]:
    """Insert a SEND right after the compute producing the data and its RECV before the compute
    consuming it. Every message gets a global key (the producer's end time in a unit-cost run,
    then the sender rank and the action) and each rank posts its messages in key order, moving
    RECVs earlier where needed: then the message with the smallest pending key always has both
    ends posted at the head of their streams, so the batches cannot deadlock, and the messages
    between two ranks match in posting order. A gap between computes reads: messages (by key),
    OFFLOADs, RELOADs."""
    n = len(place)
    costs = {F: 1.0, B: 1.0 if any(a.kind == W for o in orders for a in o) else 2.0, W: 1.0}
    ends = {(a.kind, a.chunk, a.microbatch): e for tl in timeline(orders, costs) for _, e, a in tl}
    index = [{(a.kind, a.chunk, a.microbatch): k for k, a in enumerate(order)} for order in orders]
    posts: list[list[tuple[tuple, int, Action]]] = [[] for _ in orders]  # (key, gap, action)
    for r, order in enumerate(orders):
        for k, a in enumerate(order):
            to = a.chunk + 1 if a.kind == F else a.chunk - 1
            if a.kind == W or not 0 <= to < n or place[to] == r:
                continue
            key = (ends[(a.kind, a.chunk, a.microbatch)], r, a.kind, a.chunk, a.microbatch)
            posts[r].append((key, k + 1, Action(SEND_F if a.kind == F else SEND_B, a.microbatch, a.chunk, place[to])))
            posts[place[to]].append((key, index[place[to]][(a.kind, to, a.microbatch)],
                                     Action(RECV_F if a.kind == F else RECV_B, a.microbatch, to, r)))
    gaps: list[dict[int, list[Action]]] = [{} for _ in orders]
    for r, rank_posts in enumerate(posts):
        latest = len(orders[r])
        placed = []
        for key, gap, act in sorted(rank_posts, key=lambda p: p[0], reverse=True):
            latest = gap if act.kind in (SEND_F, SEND_B) else min(gap, latest)  # a SEND cannot move
            placed.append((key, latest, act))
        for _, gap, act in sorted(placed, key=lambda p: p[0]):
            gaps[r].setdefault(gap, []).append(act)
    out: list[list[Action]] = []
    for r, order in enumerate(orders):
        acts: list[Action] = []
        for k, a in enumerate(order + [None]):
            acts += gaps[r].get(k, []) + offloads[r].get(k - 1, []) + reloads[r].get(k, [])
            if a is not None:
                acts.append(a)
        out.append(acts)
    return out
