"""Check and cost pipeline schedules from their action lists alone (pure Python, no torch).

    python -m perfmodel.schedule_sim --show 1f1b --pp 4 --microbatches 8

`validate` raises ScheduleError on a broken list; `simulate` runs an event-driven simulation that
respects cross-rank dependencies and reports the bubble, step time, and peak activations.

Units. Time: a full stage's F costs 1, B 1 and W 1 when the backward is split (a W appears),
else B 2; a chunk on a rank holding v chunks costs 1/v of that. Memory: one microbatch's
activations of one full stage (a chunk of a v-chunk rank counts 1/v). A (chunk, microbatch)
counts from the start of its F to the end of its W (its B when unsplit): the weight gradients
need each Linear's input (about 14 sbh of the 34 sbh per layer) plus the output gradients kept
from B (about 18 sbh), so a W-pending microbatch holds about as much as before its B (the same
count PipeOffload uses: +1 at F, -1 at W). Offloaded activations leave the device at the end of
OFFLOAD and return at the start of RELOAD; they are reported as `peak_offloaded`.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

from perfmodel.schedules import (B, COMM, COMPUTE, F, KINDS, OFFLOAD, RECV_B, RECV_F, RELOAD, SCHEDULES,
                                SEND_B, SEND_F, W, Action, ScheduleError, build, chunks_per_rank, timeline)

@dataclass(frozen=True)
class SimResult:
    bubble_fraction: float  # idle share of pp * step_time
    step_time: float
    peak_activations: tuple[float, ...]  # per rank, on the device
    peak_offloaded: tuple[float, ...]  # per rank, in host memory
    timeline: tuple[tuple[tuple[float, float, Action], ...], ...]  # per rank: (start, end, action)


def _layout(actions: list[list[Action]]) -> tuple[dict[int, int], bool]:
    """chunk -> rank (from where its compute runs) and whether the backward is split into B and W."""
    place: dict[int, int] = {}
    for r, acts in enumerate(actions):
        for a in acts:
            if a.kind in COMPUTE and place.setdefault(a.chunk, r) != r:
                raise ScheduleError(f"chunk {a.chunk} computes on ranks {place[a.chunk]} and {r}")
    return place, any(a.kind == W for acts in actions for a in acts)


def simulate(actions: list[list[Action]], cost: dict[str, float] | None = None, p2p: float = 0.0) -> SimResult:
    """Event-driven run of the lists: an action starts when its rank is free and its inputs are
    done (+p2p when they come from another rank). Communication actions take no time of their own."""
    place, split = _layout(actions)
    pp = len(actions)
    costs = {F: 1.0, B: 1.0 if split else 2.0, W: 1.0, OFFLOAD: 0.0, RELOAD: 0.0, **(cost or {})}
    lines = timeline(actions, costs, p2p)
    step = max((tl[-1][1] for tl in lines if tl), default=0.0)
    busy = sum(e - s for tl in lines for s, e, a in tl if a.kind in COMPUTE)
    peaks = [held_peaks(acts, split, pp / len(place)) for acts in actions]
    return SimResult(bubble_fraction=1.0 - busy / (pp * step) if step > 0 else 0.0, step_time=step,
                     peak_activations=tuple(p[0] for p in peaks), peak_offloaded=tuple(p[1] for p in peaks),
                     timeline=tuple(tuple(tl) for tl in lines))


def held_peaks(acts: list[Action], split: bool, unit: float) -> tuple[float, float]:
    """(device, host) peak units of one rank's list. A rank's holdings change only at its own
    actions, which run one after another in list order, so no timing is needed: F holds its unit
    from its start; B (W when split) frees it at its end; OFFLOAD moves it to the host at its end;
    RELOAD holds it on the device again from its start and frees the host copy at its end."""
    freed_by = W if split else B
    device = host = peak_device = peak_host = 0.0
    for a in acts:
        if a.kind in (F, RELOAD):
            device += unit
            peak_device = max(peak_device, device)
            host -= unit if a.kind == RELOAD else 0.0
        elif a.kind == freed_by:
            device -= unit
        elif a.kind == OFFLOAD:
            device, host = device - unit, host + unit
            peak_host = max(peak_host, host)
    return round(peak_device, 9), round(peak_host, 9)


def validate(actions: list[list[Action]], pp: int, microbatches: int, chunks: int) -> None:
    """Raise ScheduleError unless every (chunk, microbatch) has one F, one B (and one W when the
    backward is split) on one rank, data dependencies hold, every cross-rank edge has its SEND
    after the producer and RECV before the consumer, memory actions are paired, and the lists
    cannot deadlock under the execution contract of perfmodel.schedules."""
    if len(actions) != pp:
        raise ScheduleError(f"{len(actions)} action lists for parallel.pp={pp}")
    for r, acts in enumerate(actions):
        for a in acts:
            if (a.kind not in KINDS or not 0 <= a.microbatch < microbatches or not 0 <= a.chunk < chunks
                    or (a.peer is not None) != (a.kind in COMM) or a.peer == r
                    or (a.peer is not None and not 0 <= a.peer < pp)):
                raise ScheduleError(f"rank {r}: malformed action {a}")
    place, split = _layout(actions)
    if sorted(place) != list(range(chunks)):
        raise ScheduleError(f"chunks {sorted(set(range(chunks)) - set(place))} never run")
    where: dict[Action, tuple[int, int]] = {}
    for r, acts in enumerate(actions):
        for k, a in enumerate(acts):
            if a in where:
                raise ScheduleError(f"rank {r}: {a} appears twice")
            where[a] = (r, k)
    kinds = (F, B, W) if split else (F, B)
    for c in range(chunks):
        for i in range(microbatches):
            at = [where.get(Action(kind, i, c), (None, None))[1] for kind in kinds]
            if None in at:
                raise ScheduleError(f"chunk {c} microbatch {i} lacks {[k for k, x in zip(kinds, at) if x is None]}")
            if at != sorted(at):
                raise ScheduleError(f"rank {place[c]}: chunk {c} microbatch {i} runs {kinds} out of order")
    for c in range(chunks):
        for i in range(microbatches):
            _check_memory(where, place[c], c, i, where[Action(F, i, c)][1], where[Action(B, i, c)][1])
            _check_edges(where, place, chunks, c, i)
    found = sum(1 for a in where if a.kind in COMM)
    needed = sum(1 for c in range(chunks - 1) if place[c] != place[c + 1]) * 4 * microbatches
    if found != needed:
        raise ScheduleError(f"{found} send/recv actions where the layout needs {needed}")
    simulate(actions)  # raises on a circular wait between computes
    _check_deadlock(actions)


def _check_memory(where: dict[Action, tuple[int, int]], rank: int, c: int, i: int, f_at: int, b_at: int) -> None:
    off, rel = where.get(Action(OFFLOAD, i, c)), where.get(Action(RELOAD, i, c))
    if off is None and rel is None:
        return
    if off is None or rel is None or off[0] != rank or rel[0] != rank or not f_at < off[1] < rel[1] < b_at:
        raise ScheduleError(f"rank {rank}: chunk {c} microbatch {i} needs F < OFFLOAD < RELOAD < B on its rank")


def _check_edges(where: dict[Action, tuple[int, int]], place: dict[int, int], chunks: int, c: int, i: int) -> None:
    """The forward edge c -> c+1 and the backward edge c+1 -> c, when they cross ranks."""
    if c + 1 >= chunks or place[c] == place[c + 1]:
        return
    src, dst = place[c], place[c + 1]
    for send, producer, recv, consumer in (
            (Action(SEND_F, i, c, dst), Action(F, i, c), Action(RECV_F, i, c + 1, src), Action(F, i, c + 1)),
            (Action(SEND_B, i, c + 1, src), Action(B, i, c + 1), Action(RECV_B, i, c, dst), Action(B, i, c))):
        s, p, rv, cs = where.get(send), where[producer], where.get(recv), where[consumer]
        if s is None or rv is None:
            raise ScheduleError(f"missing {send if s is None else recv} for microbatch {i}")
        if not (s[0] == p[0] and s[1] > p[1] and rv[0] == cs[0] and rv[1] < cs[1]):
            raise ScheduleError(f"{send} must follow {producer} and {recv} precede {consumer}")


def _check_deadlock(actions: list[list[Action]]) -> None:
    """Play the execution contract: consecutive SEND/RECV form a batch that completes in posting
    order per rank; a message completes once both ends' batches are active; a rank waits for a
    RECV before the compute consuming it. Messages between two ranks match in posting order."""
    pp = len(actions)
    batches, batch_of, partner = _match_messages(actions)
    feeding = [{(a.kind, a.chunk, a.microbatch): k for k, a in enumerate(acts) if a.kind in (RECV_F, RECV_B)}
               for acts in actions]
    host, done_batches = [0] * pp, [0] * pp
    done: set[tuple[int, int]] = set()
    progress = True
    while progress:
        progress = False
        for r in range(pp):  # complete the active batch when every message's other end is active
            while done_batches[r] < len(batches[r]) and batches[r][done_batches[r]][0] < host[r]:
                for k in batches[r][done_batches[r]]:
                    q, qk = partner[(r, k)]
                    if qk < host[q] and batch_of[q][qk] == done_batches[q]:
                        done |= {(r, k), (q, qk)}
                if not all((r, k) in done for k in batches[r][done_batches[r]]):
                    break
                done_batches[r] += 1
                progress = True
        for r in range(pp):  # hosts post batches freely and wait only for the RECV they consume
            acts = actions[r]
            while host[r] < len(acts):
                a = acts[host[r]]
                recv = feeding[r].get((RECV_F if a.kind == F else RECV_B, a.chunk, a.microbatch))
                if a.kind in (F, B) and recv is not None and (r, recv) not in done:
                    break
                host[r] += 1
                progress = True
    if any(done_batches[r] < len(batches[r]) for r in range(pp)):
        stuck = [f"rank {r} at {actions[r][min(host[r], len(actions[r]) - 1)]}" for r in range(pp)
                 if done_batches[r] < len(batches[r])]
        raise ScheduleError(f"the p2p batches deadlock: {', '.join(stuck)}")


def _match_messages(actions: list[list[Action]]) -> tuple[list[list[list[int]]], list[dict[int, int]],
                                                           dict[tuple[int, int], tuple[int, int]]]:
    """(batches: rank -> batch -> action indices of its consecutive SEND/RECV; batch_of: rank ->
    action index -> its batch; partner: (rank, index) -> the other end's), matching the messages
    between two ranks in posting order; raises ScheduleError on a mismatch or an unmatched one."""
    pp = len(actions)
    batches: list[list[list[int]]] = [[] for _ in range(pp)]
    batch_of: list[dict[int, int]] = [{} for _ in range(pp)]
    queues: dict[tuple[int, int], list[tuple[int, int]]] = {}
    partner: dict[tuple[int, int], tuple[int, int]] = {}
    for r, acts in enumerate(actions):
        for k, a in enumerate(acts):
            if a.kind not in COMM:
                continue
            if k == 0 or acts[k - 1].kind not in COMM:
                batches[r].append([])
            batches[r][-1].append(k)
            batch_of[r][k] = len(batches[r]) - 1
            pair = (r, a.peer) if a.kind in (SEND_F, SEND_B) else (a.peer, r)
            queue = queues.setdefault(pair, [])
            if queue and queue[0][0] != r:  # the other end posted first
                q_rank, q_k = queue.pop(0)
                other = actions[q_rank][q_k]
                sent, got = (a, other) if a.kind in (SEND_F, SEND_B) else (other, a)
                step = 1 if sent.kind == SEND_F else -1
                if (got.kind != (RECV_F if step == 1 else RECV_B) or got.microbatch != sent.microbatch
                        or got.chunk != sent.chunk + step):
                    raise ScheduleError(f"ranks {pair}: {sent} is matched with {got} (messages match in posting order)")
                partner[(r, k)], partner[(q_rank, q_k)] = (q_rank, q_k), (r, k)
            else:
                queue.append((r, k))
    unmatched = [actions[r][k] for q in queues.values() for r, k in q]
    if unmatched:
        raise ScheduleError(f"unmatched messages: {unmatched[:4]}")
    return batches, batch_of, partner


def _show(args: argparse.Namespace) -> None:
    actions = build(args.show, args.pp, args.microbatches, args.virtual_stages, args.offload)
    validate(actions, args.pp, args.microbatches, args.pp * chunks_per_rank(args.show, args.virtual_stages))
    result = simulate(actions)
    for r, acts in enumerate(actions):
        print(f"rank {r}: {' '.join(map(str, acts))}")
    print(f"bubble {result.bubble_fraction:.4f}  step {result.step_time:g}  peak activations "
          f"{list(result.peak_activations)}  offloaded {list(result.peak_offloaded)}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--show", choices=SCHEDULES, help="print one schedule and its simulation")
    parser.add_argument("--pp", type=int, default=4)
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--virtual-stages", type=int, default=1)
    parser.add_argument("--offload", type=float, default=0.0)
    args = parser.parse_args(argv)
    if not args.show:
        parser.error("give --show SCHEDULE")
    _show(args)


if __name__ == "__main__":
    main()
