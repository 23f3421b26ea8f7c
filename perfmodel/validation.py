"""How the performance model is checked against measurement: the plans to measure and the scores.
benchmarks/perfmodel_validate.py runs the plans and reports these scores.

Plans (`candidate_plans`): every factorisation of the world into dp x pp x cp x tp_col x tp_row x
tp_depth that the model, the batch and the runtime allow, each with 1F1B, one microbatch per
stage, no ZeRO, no recomputation; with tp_col > 1 also sequence parallelism, with cp > 1 also
Ulysses. The pure data x pipeline layouts also run at micro-batch 1 and 2, with ZeRO 1-3, full and
selective recomputation and every other schedule (see `variants`). Last, the search's best plan
for each of its top layouts, so the plan `axon tune` would pick is always measured.

Scores (`score` sets each measurement beside the current model's prediction; `headline`): the
Spearman rank correlation of predicted and measured step times, the measured time of the
predicted-best plan over the measured best, and how far predicted memory is from measured. A row is a dict with pred_s, meas_s, pred_mem, meas_mem (and a name).
"""
from __future__ import annotations

import itertools
import math
import statistics
from dataclasses import dataclass
from typing import Any, Callable

from perfmodel.estimate import estimate
from perfmodel.search import search
from perfmodel.specs import AXES, Cluster, ModelSpec, Plan, PlanError

QUICK = ({"dp": 8}, {"pp": 2, "dp": 4}, {"tp_col": 2, "dp": 4}, {"cp": 2, "dp": 4}, {"pp": 8},
         {"tp_col": 2, "tp_row": 2, "tp_depth": 2})  # a handful of layouts of 8 ranks, two variants each
MEMORY_TOLERANCE = 0.10  # "within 10%"
MEMORY_KEYS = ("params", "grads", "optimizer", "activations")  # the Memory fields a measurement compares


@dataclass(frozen=True)
class Sweep:
    """What is measured: the model and batch on `world` ranks of `cluster`."""
    model: ModelSpec
    cluster: Cluster
    world: int
    global_batch_size: int
    seq_len: int

    def why_not(self, plan: Plan) -> str | None:
        """None when this build runs `plan`, else the reason (perfmodel/rules.py, which `axon train` checks)."""
        try:
            plan.check(self.model, self.world, self.global_batch_size, self.seq_len)
            estimate(self.model, plan, self.cluster, self.global_batch_size, self.seq_len)
        except PlanError as e:
            return str(e)
        return None


def layouts(world: int) -> list[dict[str, int]]:
    """Every assignment of degrees to the six axes whose product is `world`."""
    divs = [d for d in range(1, world + 1) if world % d == 0]
    return [dict(zip(AXES, degs)) for degs in itertools.product(divs, repeat=len(AXES)) if math.prod(degs) == world]


def variants(deg: dict[str, int], n_layers: int, global_batch_size: int) -> list[Plan]:
    """The plans tried for one layout (invalid or unbuilt ones are filtered later). First the
    layout with one microbatch per pipeline stage (mbs = batch / (data shards x pp): the fewest
    latency-bound collectives), then, for tensor / context layouts, sequence parallelism and
    Ulysses; for pure data x pipeline layouts (cheap to run) every other knob at mbs 1:
    mbs 2, the other schedules, ZeRO 1-3 (dp > 1), full and selective recomputation."""
    base = Plan(**deg)
    out = [base.replace(micro_batch_size=max(1, global_batch_size // (base.data_shards * base.pp)))]
    if base.tp > 1 or base.cp > 1:
        if base.tp_col > 1:
            out.append(out[0].replace(sequence_parallel=True))
        if base.cp > 1:
            out.append(out[0].replace(cp_mode="ulysses"))
        return out
    out += [base, base.replace(micro_batch_size=2), base.replace(recompute="full"),
            base.replace(recompute="selective")]
    if base.dp > 1:
        out += [base.replace(zero=z) for z in (1, 2, 3)]
    if base.pp > 1:
        out += [base.replace(schedule="gpipe"), base.replace(schedule="zbh1")]
        if (n_layers // base.pp) % 2 == 0:
            out += [base.replace(schedule=s, virtual_stages=2) for s in ("interleaved", "zbv", "vhalf", "vmin")]
    return out


def candidate_plans(sweep: Sweep, quick: bool, search_top: int = 10) -> tuple[list[Plan], int]:
    """(runnable plans, plans rejected by the checks). `quick`: the QUICK layouts, two variants
    each; else every layout's variants and the search's best plan of each of its `search_top`
    best layouts."""
    degs = [{**{a: 1 for a in AXES}, **q} for q in QUICK] if quick else layouts(sweep.world)
    seen, plans, rejected = set(), [], 0
    for deg in degs:
        tried = variants(deg, sweep.model.n_layers, sweep.global_batch_size)
        for plan in (tried[:2] if quick else tried):
            if plan in seen:
                continue
            seen.add(plan)
            if sweep.why_not(plan) is None:
                plans.append(plan)
            else:
                rejected += 1
    if not quick:
        found = search(sweep.model, sweep.cluster, sweep.world, None, sweep.global_batch_size, sweep.seq_len,
                       top=search_top)
        for plan in (e.plan for e in found.estimates):
            if plan not in seen and sweep.why_not(plan) is None:
                seen.add(plan)
                plans.append(plan)
    return plans, rejected


def ranks(xs: list[float]) -> list[float]:
    """0-based rank of each value; ties share their average rank."""
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    r = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            r[order[k]] = (i + j) / 2
        i = j + 1
    return r


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation of `a` and `b` (Pearson's over their ranks)."""
    ra, rb = ranks(a), ranks(b)
    ma, mb = statistics.fmean(ra), statistics.fmean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    return cov / (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5


def score(sweep: Sweep, results: list[dict[str, Any]], name: Callable[[Plan], str] = str) -> list[dict[str, Any]]:
    """Each measurement (plan dict, step_time_s, memory by MEMORY_KEYS) beside the current model's
    prediction for it: the rows `headline` scores."""
    rows = []
    for r in results:
        plan = Plan.from_dict(r["plan"])
        e = estimate(sweep.model, plan, sweep.cluster, sweep.global_batch_size, sweep.seq_len)
        pred_parts = {k: getattr(e.memory, k) for k in MEMORY_KEYS}
        meas_parts = {k: r["memory"][k] for k in MEMORY_KEYS}
        rows.append({"name": name(plan), "plan": r["plan"], "pred_s": e.step_time_s, "meas_s": r["step_time_s"],
                     "pred_mem": sum(pred_parts.values()), "meas_mem": sum(meas_parts.values()),
                     "pred_parts": pred_parts, "meas_parts": meas_parts, "breakdown": e.breakdown})
    return rows


def predicted_best(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return min(rows, key=lambda r: r["pred_s"])


def headline(rows: list[dict[str, Any]]) -> dict[str, float]:
    """The scores: step-time Spearman, measured time of the predicted best / measured best, and
    the share of plans whose predicted memory is within MEMORY_TOLERANCE, with the median and
    worst relative memory error."""
    rho = spearman([r["pred_s"] for r in rows], [r["meas_s"] for r in rows])
    best = min(r["meas_s"] for r in rows)
    mem_err = sorted(abs(r["pred_mem"] / r["meas_mem"] - 1) for r in rows)
    return {"spearman": rho, "best_ratio": predicted_best(rows)["meas_s"] / best,
            "mem_within_10pct": sum(e <= MEMORY_TOLERANCE for e in mem_err) / len(rows),
            "mem_median_err": statistics.median(mem_err), "mem_worst_err": mem_err[-1]}


def confirm_candidates(rows: list[dict[str, Any]], top: int) -> list[dict[str, Any]]:
    """The plans the confirmation re-measures: the predicted best, then the `top` fastest measured."""
    picked = predicted_best(rows)
    out = [picked]
    for r in sorted(rows, key=lambda r: r["meas_s"])[:top]:
        if r["name"] != picked["name"]:
            out.append(r)
    return out


def confirmed_ratio(times: dict[str, list[float]], picked: str) -> tuple[float, str]:
    """(median time of `picked` / the lowest median, the plan with that median) over the
    confirmation's rounds (`times`: plan name -> one step time per round)."""
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    best = min(medians, key=medians.__getitem__)
    return medians[picked] / medians[best], best
