"""The autotuner: rank the candidate plans (perfmodel/candidates.py) that fit by step time, best first.

Pruning keeps it fast without losing the optimum:
- best first: every layout gets a lower bound of its step time (its microbatches' work at the
  cheapest recomputation, stretched by the least bubble its schedules can have
  (`pipeline.bubble_bound`, no simulation); computed only when the cheaper bound of their compute
  alone could come first); layouts are evaluated in bound order, and the search stops once the bound passes the
  `top`-th best ranking key found; inside a layout a schedule is only costed
  (simulated) when the step's floor (its bubble at `pipeline.bubble_floor`, no offload, the least
  gradient sync and optimizer time) beats the best so far, and a micro-batch choice is dropped
  as soon as its microbatches' work alone cannot;
- a Block's costs (`block_cost.block_costs`) are computed once per search for each tensor / context
  layout and micro-batch, shared by every pp and dp; the schedule choices with what they fix once
  per (pp, microbatches) (`_schedule_table`); the per-microbatch costs once per (layout,
  micro-batch, cp_mode, recompute) and reused across schedules, offload and ZeRO choices;
- recompute (none < selective < full), activation offload (0 < 0.5 < 1) and optimizer offload
  (off < on) only ever add time and save memory, so a choice is skipped when a cheaper
  neighbour on one of those chains already fits (the fitting set is closed upwards).

Ranking: by step time raised 0.01% per mechanism turned on (`mechanisms`, a third of that per
ZeRO stage), so of two near-equal plans the simpler wins; exact ties go to the lower degree tuple
in AXES order.
"""
from __future__ import annotations

import heapq
import time
from dataclasses import dataclass
from typing import Any, Callable

from perfmodel import estimate as est
from perfmodel import pipeline, rules
from perfmodel.block_cost import BlockCosts, block_costs
from perfmodel.candidates import (ACT_OFFLOAD, MICRO_BATCH_SIZES, allowed, base_plan, constraint_key, divisors,
                                  layouts, micro_choices, schedule_choices)
from perfmodel.memory import ActivationParts, activation_parts, combine_activations, state_bytes
from perfmodel.schedules import V_SHAPED, chunks_per_rank
from perfmodel.specs import AXES, Cluster, ModelSpec, Offload, Plan, PlanError



@dataclass(frozen=True)
class SearchResult:
    estimates: list[est.Estimate]  # best first, one per distinct layout (degrees)
    candidates: int  # plans whose time was evaluated
    layouts: int  # degree tuples that passed the model-shape checks
    seconds: float


def clear_caches() -> None:
    """Forget every table the search memoizes across calls (schedule simulations, stage splits,
    group placements, divisors), so that the next search pays for all its work (benchmarks)."""
    from perfmodel import comm, split
    for cached in (pipeline.simulated, pipeline.schedule_cost, pipeline.bubble_floor, pipeline.bubble_bound,
                   pipeline.extrapolated_bubble, pipeline.run_orders, split.stage_layers, split._balanced,
                   split.rank_loads, est.busiest_loads, est.stage_params, est.rank_units, comm._inside_node, divisors):
        cached.cache_clear()


def search(m: ModelSpec, c: Cluster, world: int, constraints: dict[str, Any] | None, global_batch_size: int,
           seq_len: int, top: int = 10) -> SearchResult:
    """Every valid plan that fits, ranked by predicted step time (best per distinct layout)."""
    t0 = time.perf_counter()
    cons = {constraint_key(k): v for k, v in (constraints or {}).items()}
    best: dict[tuple[int, ...], tuple[float, tuple]] = {}
    n_layouts = n_cands = 0
    if rules.model_rules(m) or rules.setting_rules(base_plan(cons)):
        return SearchResult([], 0, 0, time.perf_counter() - t0)
    # best first: layouts in the order of a lower bound of their step time, stopping once the bound
    # passes the `top`-th best ranking key found (no plan of a later layout could enter the top). The
    # bound (`_lower_bound`) is computed only for layouts whose compute alone (`_compute_bound`, a
    # lower bound of it) does not already exceed the next layout's: a heap holds the bounded ones
    computes: dict[tuple, float] = {}
    cheap = []
    for layout in layouts(m, world, cons, seq_len):
        n_layouts += 1
        cheap.append((_compute_bound(m, c, layout, cons, global_batch_size, seq_len, computes), n_layouts, layout))
    cheap.sort(key=lambda b: b[:2])
    bounded: list[tuple[float, int, Plan, dict]] = []
    blocks: dict[tuple, BlockCosts] = {}
    scheds: dict[tuple[int, int], list[tuple]] = {}  # the search's schedule choices (`_schedule_table`)
    least: dict[tuple[int, int], float | None] = {}  # (pp, microbatches) -> the least bubble bound (`_least_bubble`)
    keys: list[float] = []  # ranking keys of the layouts found, ascending, at most `top`
    ahead = 0  # cheap[ahead:] have no bound yet
    while True:
        while ahead < len(cheap) and (not bounded or cheap[ahead][0] <= bounded[0][0]):
            _, index, layout = cheap[ahead]
            ahead += 1
            first: dict[tuple, est.MicrobatchCosts] = {}
            bound = _lower_bound(m, c, layout, cons, global_batch_size, seq_len, first, blocks, least)
            if bound < float("inf"):
                heapq.heappush(bounded, (bound, index, layout, first))
        if not bounded:
            break
        bound, _, layout, first = heapq.heappop(bounded)
        if len(keys) >= top and bound > keys[-1]:
            break
        key = tuple(getattr(layout, a) for a in AXES)
        limit = keys[-1] if len(keys) >= top else float("inf")
        timed, found = _best_for_layout(m, c, layout, cons, global_batch_size, seq_len, first, blocks, scheds,
                                        limit)
        n_cands += timed
        if found is not None:
            best[key] = found
            keys = sorted(keys + [_rank_key(found)])[:top]
    ranked = [found for _, found in sorted(best.items(), key=lambda kv: (_rank_key(kv[1]), kv[0]))[:top]]
    estimates = []
    for _, (plan_r, sched, v, zero, opt, frac) in ranked:
        plan = plan_r.replace(schedule=sched, virtual_stages=v, zero=zero, offload=Offload(opt, frac))
        plan.check(m, world, global_batch_size, seq_len)
        estimates.append(est.evaluate(m, plan, c, global_batch_size, seq_len))
    return SearchResult(estimates, n_cands, n_layouts, time.perf_counter() - t0)


def _rank_key(found: tuple[float, tuple]) -> float:
    """The ranking key of (step time, knobs): the time, raised by 0.01% per mechanism turned on;
    never below the step time, so a lower bound of the time bounds the key."""
    return found[0] * (1 + 1e-4 * _complexity(found[1]))



def _compute_bound(m: ModelSpec, c: Cluster, layout: Plan, cons: dict[str, Any], gbs: int, seq: int,
                   computes: dict[tuple, float]) -> float:
    """A lower bound of `_lower_bound`, cheap enough for every layout: the microbatches' compute
    alone, the least over every micro-batch size tried, valid or not (`computes`: a microbatch's
    compute by tensor / context layout, micro-batch size and stage layers, for the search)."""
    bound = float("inf")
    for mbs in allowed(cons, "micro_batch_size", MICRO_BATCH_SIZES):
        key = (layout.tp_col, layout.tp_row, layout.cp, layout.pp, mbs)
        compute = computes.get(key)
        if compute is None:
            compute = computes[key] = est.microbatch_compute(m, layout.replace(micro_batch_size=mbs), c, seq)
        bound = min(bound, gbs / (layout.data_shards * mbs) * compute)
    return bound


def _lower_bound(m: ModelSpec, c: Cluster, layout: Plan, cons: dict[str, Any], gbs: int, seq: int,
                 first: dict[tuple, est.MicrobatchCosts], blocks: dict[tuple, BlockCosts],
                 least_bubble: dict[tuple[int, int], float | None]) -> float:
    """A lower bound of the step time of every plan of `layout`: the microbatches' work at the
    cheapest recomputation on the least load any chunk placement can give the busiest rank
    (`est.least_loads`), stretched by the least bubble bound of the schedules that can run them
    (recomputation, pipeline messages, offload, the gradient sync and the optimizer only add to
    it); inf when no micro-batch size has a valid schedule. Fills `first` with each such
    (micro-batch size, microbatches, cp_mode) choice's bound costs at that recomputation, for
    `_best_for_layout`; `blocks`: the search's Block costs (`_block`); `least_bubble`: its
    `_least_bubble` memo."""
    plan = layout.replace(recompute=allowed(cons, "recompute", rules.RECOMPUTE)[0])  # cheapest first
    least = est.least_loads(m, layout.pp)
    bound = float("inf")
    for mbs, micro, cp_mode in micro_choices(m, layout, cons, gbs):
        bubble = _least_bubble(m, layout, micro, cons, least_bubble)
        if bubble is None:
            continue
        mb = est.microbatch_costs(m, plan, c, seq, micro, _block(m, c, plan, seq, blocks, mbs, cp_mode), least)
        first[(mbs, micro, cp_mode)] = mb
        bound = min(bound, est.step_time(micro * mb.total, bubble, 0.0, 0.0, c.ranks_per_unit)[1])
    return bound


def _least_bubble(m: ModelSpec, layout: Plan, micro: int, cons: dict[str, Any],
                  memo: dict[tuple[int, int], float | None]) -> float | None:
    """The least `pipeline.bubble_bound` (no simulation) over the schedules the rules allow for
    `layout`'s pp at `micro` microbatches; None when there is none; once per search for each
    (pp, micro) (`memo`)."""
    key = (layout.pp, micro)
    if key not in memo:
        bounds = [pipeline.bubble_bound(sched, layout.pp, micro, v)
                  for sched, v in schedule_choices(m, layout, micro, cons)]
        memo[key] = min(bounds) if bounds else None
    return memo[key]


def _block(m: ModelSpec, c: Cluster, plan: Plan, seq: int, blocks: dict[tuple, BlockCosts], mbs: int,
           cp_mode: str) -> BlockCosts:
    """`block_cost.block_costs` of `plan` at micro-batch size `mbs` and `cp_mode`, computed once per search
    for each value of what it depends on that the search varies (the overlap switches are held by
    the constraints)."""
    key = (plan.tp_col, plan.tp_row, plan.tp_depth, plan.cp, plan.sequence_parallel, cp_mode, mbs)
    found = blocks.get(key)
    if found is None:
        found = blocks[key] = block_costs(m, plan.replace(micro_batch_size=mbs, cp_mode=cp_mode), c, seq)
    return found


def _complexity(knobs: tuple) -> float:
    """How many mechanisms a plan turns on: breaks near-ties (within 0.01% per mechanism) in favour
    of the simpler plan."""
    plan_r, sched, v, zero, opt, frac = knobs
    return complexity(plan_r.replace(virtual_stages=v, zero=zero, offload=Offload(opt, frac)))


def mechanisms(plan: Plan) -> list[str]:
    """The mechanisms a plan turns on (besides ZeRO), as the tie-break counts them."""
    used = {"pp": plan.pp > 1, "cp": plan.cp > 1, "tp_col": plan.tp_col > 1, "tp_row": plan.tp_row > 1,
            "tp_depth": plan.tp_depth > 1, f"recompute={plan.recompute}": plan.recompute != "none",
            "offload.optimizer": plan.offload.optimizer, "offload.activations": plan.offload.activations > 0,
            "virtual_stages": plan.virtual_stages > 1}
    return [name for name, on in used.items() if on]


def complexity(plan: Plan) -> float:
    """The tie-break's count: one per mechanism, a third per ZeRO stage."""
    return len(mechanisms(plan)) + plan.zero / 3


def _best_for_layout(m: ModelSpec, c: Cluster, layout: Plan, cons: dict[str, Any], gbs: int, seq: int,
                     first: dict[tuple, est.MicrobatchCosts], blocks: dict[tuple, BlockCosts],
                     scheds: dict[tuple[int, int], list[tuple]], limit: float = float("inf")
                     ) -> tuple[int, tuple[float, tuple] | None]:
    """(plans timed, (step time, knobs) of this layout's fastest fitting plan or None); `first`:
    the micro-batch choices with their bound costs at the cheapest recomputation
    (`_lower_bound`). Plans slower than `limit` (the search's `top`-th best key) are not looked
    for; a schedule is only costed (simulated) when the step's floor (no offload, the least
    gradient sync and optimizer time, the bubble's lower bound) could beat both that and the
    layout's best so far. The microbatch costs, gradient sync and states are those of each
    schedule's chunk placement (`_chunking`), computed once per placement; `scheds`: the search's
    schedule choices (`_schedule_table`)."""
    pp = layout.pp
    zeros = allowed(cons, "zero", rules.ZERO_STAGES if layout.dp * layout.cp > 1 else (0,))
    states = _placement_states(m, c, seq, {zero: layout.replace(zero=zero) for zero in zeros}, cons)
    facts = allowed(cons, "offload.activations", ACT_OFFLOAD if pp > 1 else (0.0,))
    recomputes = allowed(cons, "recompute", rules.RECOMPUTE)  # cheapest first
    best, timed = None, 0
    tables: dict[int, list[tuple]] = {}  # by micro-batch size: its schedules with what they fix
    for (mbs, micro, cp_mode), bound in first.items():
        blk = _block(m, c, layout, seq, blocks, mbs, cp_mode)
        syncs: dict[tuple, list] = {}  # by chunk placement: the state choices with their sync, fastest first
        by_sync: dict[tuple, dict[int, float]] = {}  # (psi, units, busiest loads) -> {zero: sync seconds}
        for k, recompute in enumerate(recomputes):
            plan_r = layout.replace(micro_batch_size=mbs, cp_mode=cp_mode, recompute=recompute)
            if k:
                bound = est.microbatch_costs(m, plan_r, c, seq, micro, blk, est.least_loads(m, pp))
            if _hopeless(micro * bound.total, limit, best):
                break  # below every schedule's floor; more recomputation only adds time
            table = tables.get(mbs)
            if table is None:
                table = tables[mbs] = [(*entry, states(entry[0], entry[1]))
                                       for entry in _schedule_table(m, layout, seq, micro, cons, scheds)]
            send = est.p2p_send(m, plan_r, c, seq)
            costs: dict[tuple, est.MicrobatchCosts] = {}  # by the loads of the ranks that can be the busiest
            parts = None
            for sched, v, key, loads, sends, bubble, placed in table:
                mb = costs.get(loads)
                if mb is None:
                    mb = costs[loads] = est.microbatch_costs(m, plan_r, c, seq, micro, blk, loads)
                busy = micro * (mb.total + sends * send)
                # no offload, the least sync and optimizer time, the bubble's lower bound: first with no sync
                if _hopeless(est.step_time(busy, bubble, 0.0, placed[3], c.ranks_per_unit)[1], limit, best):
                    continue
                options = syncs.get(key)
                if options is None:  # the sync hides behind backward, which recompute does not change
                    options = syncs[key] = _with_sync(placed, c, mb, micro, by_sync, loads)
                if _hopeless(est.step_time(busy, bubble, *options[0][:2], c.ranks_per_unit)[1], limit, best):
                    continue
                if parts is None:
                    parts = activation_parts(m, plan_r, seq, c.dtype_bytes)
                if len(options[0]) < 6:  # the state bytes, once the placement passes a floor
                    options = syncs[key] = _with_bytes(m, c, seq, options)
                n, found = _fitting(c, parts, (sched, pp, micro, v), busy, mb.compute,
                                    options, facts, (bubble, limit, best[0] if best is not None else float("inf")))
                timed += n
                for step, (zero, opt, frac) in found:
                    if best is None or step < best[0]:
                        best = (step, (plan_r, sched, v, zero, opt, frac))
    return timed, best


def _schedule_table(m: ModelSpec, layout: Plan, seq: int, micro: int, cons: dict[str, Any],
                    memo: dict[tuple[int, int], list[tuple]]) -> list[tuple]:
    """The schedule choices of `layout`'s pp at `micro` microbatches with what each fixes whatever
    the layout's other degrees and the recomputation: (schedule, v, chunk placement (`_chunking`),
    the loads of the ranks that can be the busiest, activation sends per microbatch (both
    directions), the bubble's lower bound); computed once per search for each (pp, micro) (`memo`)."""
    pp = layout.pp
    found = memo.get((pp, micro))
    if found is None:
        found = memo[(pp, micro)] = [
            (sched, v, _chunking(sched, v), est.busiest_loads(m, pp, seq, sched, v),
             2 * pipeline.p2p_per_microbatch(sched, v), pipeline.bubble_floor(sched, pp, micro, v))
            for sched, v in schedule_choices(m, layout, micro, cons)]
    return found


def _hopeless(floor: float, limit: float, best: tuple[float, tuple] | None) -> bool:
    """Whether a plan whose step is at least `floor` can neither enter the top (`limit`) nor beat
    the layout's best so far."""
    return floor > limit or (best is not None and floor >= best[0])


def _with_sync(placed: tuple, c: Cluster, mb: est.MicrobatchCosts, micro: int, memo: dict, loads: tuple
               ) -> list[tuple]:
    """A chunk placement's state choices (`_placement_states`) as (sync s, optimizer s, plan), the
    gradient sync priced against that placement's bottleneck microbatch `mb` (computed once per
    ZeRO stage, parameters, units and busiest loads: `memo`), fastest first."""
    psi, units, plans, _ = placed
    by_zero = memo.setdefault((psi, units, loads), {})
    out = []
    for plan, opt_s in plans:
        sync = by_zero.get(plan.zero)
        if sync is None:
            sync = by_zero[plan.zero] = est.gradient_sync(plan, c, psi, mb, micro, units)
        out.append((sync, opt_s, plan))
    return sorted(out, key=lambda o: o[0] + o[1])


def _with_bytes(m: ModelSpec, c: Cluster, seq: int, options: list[tuple]) -> list[tuple]:
    """`_with_sync`'s choices with their memory, for `_fitting`: (sync s, optimizer s, device bytes
    besides activations, host bytes, zero, optimizer offloaded)."""
    out = []
    for sync, opt_s, plan in options:
        params, grads, optimizer, buffers, host = state_bytes(m, plan, c, seq)
        out.append((sync, opt_s, params + grads + optimizer + buffers + c.overhead_bytes, host, plan.zero,
                    plan.offload.optimizer))
    return out


def _fitting(c: Cluster, parts: ActivationParts, schedule: tuple[str, int, int, int], busy: float, compute: float,
             options: list[tuple], facts: tuple[float, ...],
             floor: tuple[float, float, float] = (0.0, float("inf"), float("inf"))
             ) -> tuple[int, list[tuple[float, tuple]]]:
    """One schedule (name, pp, microbatches, v) of `_best_for_layout`: (plans timed, [(step time,
    (zero, optimizer offload, activation offload))]), the fastest fitting state choice (`options`,
    fastest first) at each offload fraction tried; the fractions stop once the fastest states fit
    (more offload only adds time), or once the step's floor at that fraction cannot win (`floor`:
    the bubble's lower bound, the search's limit and the layout's best step so far; a plan found
    here at a lower fraction counts as best). Past no offload only the states that fit the device
    with the most offload are tried (a fraction offloads a superset of a smaller one's pairs:
    perfmodel/schedules.py `_offload_plan`, so less offload leaves more on the device), and the
    offload plan is simulated only for fractions that could win. `busy`: the step's busy seconds
    before offload."""
    timed, found = 0, []
    name, pp, micro, v = schedule
    bubble, limit, best = floor
    for frac in facts:
        busy_f = busy + micro * est.offload_time(frac, parts.unit, c, compute)
        if frac:
            options = _fit_with_most_offload(c, parts, schedule, facts[-1], options)
            if not options:
                break
            least = est.step_time(busy_f, bubble, *options[0][:2], c.ranks_per_unit)[1]
            if least > limit or least >= min([best] + [step for step, _ in found]):
                break  # more offload only adds time
        cost = pipeline.schedule_cost(name, pp, micro, v, frac)
        acts, host_acts = combine_activations(parts, pp, cost)
        for i, (sync, opt_s, state, host, zero, opt) in enumerate(options):
            if state + acts > c.hbm_bytes or (host + host_acts) * c.gpus_per_node > c.host_bytes:
                continue
            timed += 1
            found.append((est.step_time(busy_f, cost.bubble_fraction, sync, opt_s, c.ranks_per_unit)[1], (zero, opt, frac)))
            break
        else:
            continue
        if i == 0:
            break
    return timed, found


def _fit_with_most_offload(c: Cluster, parts: ActivationParts, schedule: tuple[str, int, int, int], frac: float,
                           options: list[tuple]) -> list[tuple]:
    """The state choices that fit the device with `frac` of the activations offloaded (its plan
    offloads every eligible pair: cheap to build)."""
    acts = combine_activations(parts, schedule[1], pipeline.schedule_cost(*schedule, frac))[0]
    return [o for o in options if o[2] + acts <= c.hbm_bytes]


def _placement_states(m: ModelSpec, c: Cluster, seq: int, by_zero: dict[int, Plan], cons: dict[str, Any]
                      ) -> Callable[[str, int], list]:
    """`states(schedule, v)`: a layout's state choices under that schedule's chunk placement
    (`_chunking`), computed once per placement: (parameters of the rank with the most
    (`stage_params`, per tensor rank), its ZeRO units, [(plan with the ZeRO stage and optimizer
    offload, optimizer seconds)], the least of those seconds)."""
    memo: dict[tuple, tuple] = {}

    def states(schedule: str, v: int) -> tuple:
        key = _chunking(schedule, v)
        if key not in memo:
            any_zero = next(iter(by_zero.values())).replace(schedule=schedule, virtual_stages=v)
            psi = est.stage_params(m, any_zero.pp, seq, schedule, v) / any_zero.tp
            plans = [p.replace(schedule=schedule, virtual_stages=v, offload=Offload(opt, 0.0))
                     for p in by_zero.values() for opt in allowed(cons, "offload.optimizer", (False, True))]
            timed = [(plan, est.optimizer_time(plan, c, psi)) for plan in plans]
            memo[key] = (psi, est.zero_units(m, any_zero, seq), timed, min(opt_s for _, opt_s in timed))
        return memo[key]
    return states


def _chunking(schedule: str, virtual_stages: int) -> tuple[bool, int]:
    """What a rank's load depends on besides the layout (perfmodel/split.py `rank_loads`): V-shaped
    or round-robin placement, and chunks per rank."""
    return schedule in V_SHAPED, chunks_per_rank(schedule, virtual_stages)



def best_plan(m: ModelSpec, c: Cluster, world: int, constraints: dict[str, Any] | None, global_batch_size: int,
              seq_len: int) -> tuple[Plan, est.Estimate]:
    """The fastest plan that fits (what `axon train parallel=auto` runs); PlanError when none does."""
    result = search(m, c, world, constraints, global_batch_size, seq_len, top=1)
    if not result.estimates:
        fixed = ", ".join(f"parallel.{k}={v}" for k, v in (constraints or {}).items()) or "no constraints"
        raise PlanError(
            f"no layout of {world} ranks fits {c.hbm_bytes / 2**30:.1f} GiB per device for this model "
            f"(train.global_batch_size={global_batch_size}, train.seq_len={seq_len}, {fixed}); lower "
            f"train.seq_len or the batch, relax the parallel.* constraints, or use more devices")
    best = result.estimates[0]
    return best.plan, best
