"""The search's candidate plans: the user's `parallel.*` constraints, and every layout, schedule
and micro-batch choice the rules accept under them; when none is left, why (`rejections`) and
where the smallest memory is (`leanest_plans`, axon/tune_explain.py).

Searched (perfmodel/search.py ranks them): dp, pp, cp, tp_col, tp_row, tp_depth (every
factorisation of the world size), ZeRO stage, schedule with its virtual stages, micro-batch size,
cp_mode, recomputation, optimizer offload and the activation-offload fraction. Anything in
`constraints` (the `parallel.*` settings the user fixed) is held. Validity is perfmodel/rules.py's,
checked group by group as each knob is fixed, so the search proposes exactly the plans
`Plan.check` accepts. Sequence parallelism is on whenever the tensor group splits activations:
same traffic, less memory.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import fields
from functools import lru_cache
from typing import Any, Iterator

from perfmodel import rules
from perfmodel.schedules import V_SHAPED
from perfmodel.specs import AXES, ModelSpec, Offload, Plan, PlanError

SCHEDULE_ORDER = ("1f1b", "gpipe", "zbh1", "interleaved", "zbv", "vhalf", "vmin")
ACT_OFFLOAD = (0.0, 0.5, 1.0)
MAX_MICRO_BATCH = 16
MICRO_BATCH_SIZES = tuple(2**i for i in range(MAX_MICRO_BATCH.bit_length()))  # 1, 2, 4, ... MAX_MICRO_BATCH
MAX_INTERLEAVE = 8


@lru_cache(maxsize=1024)
def divisors(n: int) -> tuple[int, ...]:
    return tuple(d for d in range(1, n + 1) if n % d == 0)


def constraint_key(name: str) -> str:
    """Validate a constraint name (a Plan field, or offload.optimizer / offload.activations)."""
    known = {f.name for f in fields(Plan)} - {"offload"} | {"offload.optimizer", "offload.activations"}
    if name not in known:
        raise PlanError(f"parallel.{name} is not a parallel setting; known: {sorted(known)}")
    return name


def parse_constraints(overrides: list[str]) -> dict[str, Any]:
    """The `parallel.*=value` Hydra overrides the user gave, as {field: value}; `parallel.auto`
    and group selections (`parallel=auto`) are not constraints."""
    out: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.lstrip("+").partition("=")
        if not sep or not key.startswith("parallel.") or key == "parallel.auto":
            continue
        out[constraint_key(key[len("parallel."):])] = _parse_value(raw)
    return out


def _parse_value(raw: str) -> Any:
    low = raw.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    for kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            pass
    return raw.strip().strip("'\"")


def allowed(constraints: dict[str, Any], name: str, default: tuple) -> tuple:
    """The values `name` may take: the one the constraints fix, else `default`."""
    return (constraints[name],) if name in constraints else default


def factorisations(world: int, axes: tuple[str, ...], cons: dict[str, Any]) -> Iterator[dict[str, int]]:
    """Every assignment of degrees to `axes` whose product is `world`, pinned ones held."""
    if not axes:
        if world == 1:
            yield {}
        return
    axis, rest = axes[0], axes[1:]
    for d in ([cons[axis]] if axis in cons else divisors(world)):
        if d >= 1 and world % d == 0:
            for tail in factorisations(world // d, rest, cons):
                yield {axis: d, **tail}


def layouts(m: ModelSpec, world: int, cons: dict[str, Any], seq: int) -> Iterator[Plan]:
    """Plans with the degrees (and sequence parallelism) set, whose product is `world` and that
    the split rules accept for this model and sequence."""
    base = base_plan(cons)
    for degrees in factorisations(world, AXES, cons):
        sp = allowed(cons, "sequence_parallel", (degrees["tp_col"] * degrees["tp_row"] > 1,))[0]
        plan = base.replace(sequence_parallel=sp, **degrees)
        if not rules.split_rules(m, plan, seq):
            yield plan


def schedule_choices(m: ModelSpec, plan: Plan, micro: int, cons: dict[str, Any]) -> list[tuple[str, int]]:
    """(schedule, virtual stages) pairs the rules accept for this layout and microbatch count."""
    if plan.pp == 1:
        candidates = [(cons.get("schedule", "1f1b"), cons.get("virtual_stages", 1))]
    else:
        candidates = [(sched, v) for sched in allowed(cons, "schedule", SCHEDULE_ORDER)
                      for v in allowed(cons, "virtual_stages", tuple(range(2, MAX_INTERLEAVE + 1))
                                        if sched == "interleaved" else (2,) if sched in V_SHAPED else (1,))]
    out = []
    for sched, v in candidates:
        p = plan.replace(schedule=sched, virtual_stages=v)
        if not rules.chunk_rules(m, p) and not rules.schedule_rules(p, micro):
            out.append((sched, v))
    return out


def base_plan(cons: dict[str, Any]) -> Plan:
    """The plan holding every non-degree constraint."""
    base = Plan(**{k: v for k, v in cons.items() if "." not in k and k not in AXES})
    if "offload.optimizer" in cons or "offload.activations" in cons:
        base = base.replace(offload=Offload(bool(cons.get("offload.optimizer", False)),
                                            float(cons.get("offload.activations", 0.0))))
    return base


def micro_choices(m: ModelSpec, layout: Plan, cons: dict[str, Any], gbs: int) -> Iterator[tuple[int, int, str]]:
    """(micro-batch size, microbatches, cp_mode) choices the batch and context rules accept."""
    cp_modes = allowed(cons, "cp_mode", rules.CP_MODES if layout.cp > 1 else ("ring",))
    modes = [mode for mode in cp_modes if not rules.cp_mode_rules(m, layout.replace(cp_mode=mode))]
    for mbs in allowed(cons, "micro_batch_size", MICRO_BATCH_SIZES):
        sized = layout.replace(micro_batch_size=mbs)
        if not rules.batch_rules(sized, gbs):
            micro = sized.microbatches(gbs)
            for cp_mode in modes:
                yield mbs, micro, cp_mode


def rejections(m: ModelSpec, world: int, constraints: dict[str, Any] | None, global_batch_size: int,
               seq_len: int) -> tuple[Counter, int, int]:
    """Why layouts are dropped, for explaining an empty search: (rule message -> layouts it
    rejects, layouts that pass every rule, layouts enumerated). A layout's messages are its first
    failing group's, at its first micro-batch size (the search tries every size: `micro_choices`)."""
    cons = {constraint_key(k): v for k, v in (constraints or {}).items()}
    base = base_plan(cons)
    found = rules.model_rules(m) + rules.setting_rules(base)
    if found:
        return Counter(v.message for v in found), 0, 0
    counts: Counter = Counter()
    valid = total = 0
    for degrees in factorisations(world, AXES, cons):
        sp = allowed(cons, "sequence_parallel", (degrees["tp_col"] * degrees["tp_row"] > 1,))[0]
        reasons = _layout_reasons(m, base.replace(sequence_parallel=sp, **degrees), cons, global_batch_size, seq_len)
        counts.update(v.message for v in reasons)
        valid += not reasons
        total += 1
    if not total:  # the fixed degrees leave no factorisation of the world
        pinned = base.replace(**{a: cons.get(a, 1) for a in AXES})
        counts.update(v.message for v in rules.world_rules(pinned, world) or [rules.Violation(
            "parallel.dp", f"the fixed degrees {', '.join(f'parallel.{a}={cons[a]}' for a in AXES if a in cons)} "
                           f"leave no factorisation of the {world} ranks; change or free one of them")])
    return counts, valid, total


def _layout_reasons(m: ModelSpec, layout: Plan, cons: dict[str, Any], gbs: int, seq: int) -> list[rules.Violation]:
    """The rules that leave `layout` without a single valid plan ([] when one exists)."""
    found = rules.split_rules(m, layout, seq)
    if found:
        return found
    choices = list(micro_choices(m, layout, cons, gbs))
    if not choices:
        mbs = allowed(cons, "micro_batch_size", (1,))[0]
        sized = layout.replace(micro_batch_size=mbs)
        return rules.batch_rules(sized, gbs) or rules.cp_mode_rules(m, layout.replace(
            cp_mode=allowed(cons, "cp_mode", ("ulysses",))[0]))
    if any(schedule_choices(m, layout, micro, cons) for _, micro, _ in choices):
        return []
    mbs, micro, _ = choices[0]
    p = layout.replace(micro_batch_size=mbs, schedule=allowed(cons, "schedule", ("1f1b",))[0],
                       virtual_stages=allowed(cons, "virtual_stages", (1,))[0])
    return rules.chunk_rules(m, p) + rules.schedule_rules(p, micro) or [rules.Violation(
        "parallel.schedule", f"no pipeline schedule accepts parallel.pp={layout.pp} with {micro} microbatches; "
                             f"change parallel.pp or train.global_batch_size")]


def leanest_plans(m: ModelSpec, world: int, constraints: dict[str, Any] | None, global_batch_size: int,
                  seq_len: int) -> Iterator[Plan]:
    """Each valid layout's plans with the most memory-saving knobs the constraints allow (the
    highest ZeRO stage, full recomputation, offload on), one per micro-batch size, cp_mode and
    schedule: where the smallest predicted memory is found when nothing fits."""
    cons = {constraint_key(k): v for k, v in (constraints or {}).items()}
    if rules.model_rules(m) or rules.setting_rules(base_plan(cons)):
        return
    for layout in layouts(m, world, cons, seq_len):
        zero = max(allowed(cons, "zero", rules.ZERO_STAGES if layout.dp * layout.cp > 1 else (0,)))
        lean = layout.replace(zero=zero, recompute=allowed(cons, "recompute", rules.RECOMPUTE)[-1], offload=Offload(
            max(allowed(cons, "offload.optimizer", (True,))),
            max(allowed(cons, "offload.activations", ACT_OFFLOAD if layout.pp > 1 else (0.0,)))))
        for mbs, micro, cp_mode in micro_choices(m, layout, cons, global_batch_size):
            for sched, v in schedule_choices(m, layout, micro, cons):
                yield lean.replace(micro_batch_size=mbs, cp_mode=cp_mode, schedule=sched, virtual_stages=v)

