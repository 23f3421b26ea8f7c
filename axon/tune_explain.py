"""Why `axon tune` picked, rejected or could not place a layout: the memory fit against the
device's HBM, what overflows and which knobs would help, the rules that drop every layout, the
tie-break that decided #1 over #2, what limits the pick, and `--why-not` for a given layout.

Everything here reads perfmodel's answers (estimate.evaluate, candidates.rejections /
leanest_plans, search.mechanisms, memory.memory); no rule or cost is re-stated.
"""
from __future__ import annotations

from typing import Any

from perfmodel import candidates
from perfmodel import search as srch
from perfmodel.estimate import Estimate
from perfmodel.memory import Memory, memory
from perfmodel.specs import AXES, Cluster, ModelSpec, Offload, Plan, PlanError

GiB = 2**30
TIE = 0.005  # #1 and #2 closer than this (relative step time) are a tie the output explains
STEP_PARTS = {"compute_s": "compute", "recompute_s": "recompute", "tensor_comm_s": "exposed tensor comm",
              "context_comm_s": "exposed context comm", "pipeline_p2p_s": "exposed pipeline comm",
              "offload_s": "activation offload", "bubble_s": "pipeline bubble", "grad_sync_s": "exposed grad sync",
              "optimizer_s": "optimizer"}
MEMORY_PARTS = ("params", "grads", "optimizer", "activations", "buffers", "overhead")
ZERO_FOR = {"optimizer": 1, "grads": 2, "params": 3}  # the ZeRO stage that shards each model state
DEGREES = ("dp", "pp", "cp", "tp_col", "tp_row", "tp_depth")  # as --why-not takes them


def gib(n: float) -> str:
    """Bytes for people: GiB from 1 GiB up, MiB below."""
    return f"{n / GiB:.1f} GiB" if abs(n) >= GiB else f"{n / 2**20:.1f} MiB"


def memory_fit(mem: Memory, c: Cluster) -> str:
    """`total of capacity GiB (share)`, the table's fit column."""
    return f"{mem.total / GiB:.1f}/{c.hbm_bytes / GiB:.1f} {mem.total / c.hbm_bytes:.0%}"


def overflow(mem: Memory, c: Cluster) -> str:
    """What a plan needs beyond the device (and host) memory, largest component first."""
    parts = sorted(((getattr(mem, k), k) for k in MEMORY_PARTS), reverse=True)
    shown = ", ".join(f"{k} {gib(v)}" for v, k in parts if v >= 0.01 * mem.total)
    text = (f"needs {gib(mem.total)} per device, {gib(mem.total - c.hbm_bytes)} over the {gib(c.hbm_bytes)} "
            f"of cluster={c.name} ({shown})")
    host = mem.host * c.gpus_per_node
    if host > c.host_bytes:
        text += f"; offloaded {gib(host)} per node exceeds the host's {gib(c.host_bytes)}"
    return text


def helpful_knobs(plan: Plan, mem: Memory) -> list[str]:
    """Settings that shrink the largest memory components of `plan`, biggest component first."""
    shards = plan.dp * plan.cp > 1
    big = [k for k in ("optimizer", "grads", "params") if getattr(mem, k) > 0.1 * mem.total]
    stage = max([ZERO_FOR[k] for k in big], default=0)
    zero = shards and plan.zero < stage and f"parallel.zero={stage} (shards over dp x cp)"
    by_part = {
        "optimizer": [zero, not plan.offload.optimizer and "parallel.offload.optimizer=true"],
        "grads": [zero],
        "params": [zero, "more parallel.tp_col/tp_row or parallel.pp"],
        "activations": [plan.recompute != "full" and "parallel.recompute=full",
                        plan.micro_batch_size > 1 and "a lower parallel.micro_batch_size",
                        plan.pp > 1 and plan.offload.activations < 1 and "parallel.offload.activations=1",
                        "more parallel.cp or parallel.tp_col (sequence parallel)"],
        "buffers": [plan.tp_depth > 1 and "parallel.cache_tp_weights=false or a lower parallel.tp_depth"],
    }
    out: list[str] = []
    for _, part in sorted(((getattr(mem, k), k) for k in by_part), reverse=True):
        out += [k for k in by_part[part] if k and k not in out]
    return out[:4] + ["more devices (cluster.nodes)"]


def pinned_error(e: Estimate, c: Cluster, fitting: Estimate | None) -> PlanError:
    """The error for a fully pinned layout that does not fit: what overflows, and what would fit."""
    text = f"the pinned layout {_degrees(e.plan)} {overflow(e.memory, c)}"
    if fitting is not None:
        changed = _changed(e.plan, fitting.plan)
        text += (f"; its fastest plan that fits sets {' '.join(changed)} ({gib(fitting.memory.total)}, "
                 f"{fitting.step_time_s:.3f} s/step)")
    return PlanError(text + f"; try {', '.join(helpful_knobs(e.plan, e.memory))}")


def _degrees(p: Plan) -> str:
    return ",".join(f"{a}={getattr(p, a)}" for a in DEGREES)


def _changed(old: Plan, new: Plan) -> list[str]:
    """`parallel.k=v` for every setting `new` changes from `old`."""
    a, b = old.to_dict(), new.to_dict()
    out = [f"parallel.{k}={str(b[k]).lower() if isinstance(b[k], bool) else b[k]}" for k in a
           if k != "offload" and a[k] != b[k]]
    return out + [f"parallel.offload.{k}={str(v).lower()}" for k, v in b["offload"].items() if a["offload"][k] != v]


def rule_reasons(m: ModelSpec, world: int, cons: dict[str, Any], gbs: int, seq: int, shown: int = 3
                 ) -> tuple[str, int]:
    """(the most common rule messages with how many layouts each rejects, layouts passing every rule)."""
    counts, valid, total = candidates.rejections(m, world, cons, gbs, seq)
    top = counts.most_common(shown)
    text = (f"{total - valid} of {total} layouts rejected: " if total else "") + "; ".join(f"[{n} layout{'s' * (n > 1)}] {msg}" for msg, n in top)
    if len(counts) > shown:
        text += f"; and {len(counts) - shown} other rule message(s)"
    return text, valid


def leanest(m: ModelSpec, c: Cluster, world: int, cons: dict[str, Any], gbs: int, seq: int
            ) -> tuple[Plan, Memory] | None:
    """The valid plan with the smallest predicted device memory (among those whose offloaded bytes
    fit the host, when any do), and that memory."""
    free = "offload.optimizer" not in cons and "offload.activations" not in cons
    best, best_key = None, None
    for lean in candidates.leanest_plans(m, world, cons, gbs, seq):
        for plan in [lean] + ([lean.replace(offload=Offload())] if free and lean.offload != Offload() else []):
            mem = memory(m, plan, c, seq, plan.microbatches(gbs))
            key = (mem.host * c.gpus_per_node > c.host_bytes, mem.total)  # host-fitting plans first
            if best_key is None or key < best_key:
                best, best_key = (plan, mem), key
    return best


def no_layout_error(m: ModelSpec, c: Cluster, world: int, cons: dict[str, Any], gbs: int, seq: int,
                    what: str) -> PlanError:
    """Why no layout of `what` was returned: the rules (divisibility), or memory (the leanest plan)."""
    reasons, valid = rule_reasons(m, world, cons, gbs, seq)
    if not valid:
        return PlanError(f"no layout of {what} passes the rules (divisibility, not memory): {reasons}")
    found = leanest(m, c, world, cons, gbs, seq)
    if found is None:
        return PlanError(f"no plan of {what} passes the rules: {reasons or 'no valid knob choice'}")
    plan, mem = found
    return PlanError(f"no layout of {what} fits memory: {valid} pass the rules but the leanest, "
                     f"{_degrees(plan)} zero={plan.zero} recompute={plan.recompute}, {overflow(mem, c)}; "
                     f"add devices (cluster.nodes), lower train.seq_len or train.global_batch_size, or relax "
                     f"the parallel.* constraints")


def limits(e: Estimate, c: Cluster) -> str:
    """What limits the pick: the largest step component with its share, and the memory headroom."""
    part, secs = max(e.breakdown.items(), key=lambda kv: kv[1])
    room = c.hbm_bytes - e.memory.total
    return (f"limited by: {STEP_PARTS.get(part, part)} {secs:.3f}s ({secs / e.step_time_s:.0%} of the step); "
            f"memory headroom {gib(room)} ({room / c.hbm_bytes:.0%} of {gib(c.hbm_bytes)} HBM)")


def overlap(e: Estimate) -> list[str]:
    """Per link, the collectives hidden behind compute (those overlapped with one pass share the
    link: perfmodel/block_cost.py `share_link`) and what of the communication stays exposed."""
    exposed = ", ".join(f"{STEP_PARTS[k]} {e.breakdown[k]:.3f}s" for k in ("tensor_comm_s", "context_comm_s",
                                                                         "pipeline_p2p_s", "grad_sync_s")
                        if e.breakdown.get(k, 0) > 0)
    lines = []
    for kind, parts in sorted(e.overlap.items()):
        hidden = ", ".join(f"{axis} {secs:.3f}s" for axis, secs in parts.items() if axis != "compute")
        lines.append(f"overlap on the {kind} link: {hidden} hidden behind {parts['compute']:.3f}s of compute")
    return lines + [f"exposed communication: {exposed or 'none'}"]


def tie(win: Estimate, other: Estimate) -> str | None:
    """The tie-break that put `win` first, when #1 and #2 are within TIE of each other."""
    t1, t2 = win.step_time_s, other.step_time_s
    if abs(t2 - t1) > TIE * t1:
        return None
    mem = f"#1 {gib(win.memory.total)} vs #2 {gib(other.memory.total)}"
    if t1 < t2:
        rule = f"by step time ({(t2 / t1 - 1):.2%} faster)"
        if srch.complexity(win.plan) < srch.complexity(other.plan):
            rule += f", and it has fewer mechanisms ({_mech(win.plan)} vs {_mech(other.plan)})"
    elif srch.complexity(win.plan) < srch.complexity(other.plan):
        rule = (f"by fewer mechanisms ({_mech(win.plan)} vs {_mech(other.plan)}; the ranking adds 0.01% per "
                f"mechanism and a third of that per ZeRO stage)")
    else:
        rule = f"by the degree order ({', '.join(AXES)}, lower first) at equal time and mechanisms"
    return f"tie: #1 and #2 within {TIE:.1%}; picked {rule}; memory {mem}"


def _mech(p: Plan) -> str:
    return "+".join(srch.mechanisms(p) + ([f"zero={p.zero}"] if p.zero else [])) or "none"


def component_diffs(win: Estimate, other: Estimate, shown: int = 3) -> str:
    """The step components where `other` differs most from `win`, largest difference first."""
    diffs = sorted(((other.breakdown[k] - v, k) for k, v in win.breakdown.items()), key=lambda d: -abs(d[0]))
    return ", ".join(f"{STEP_PARTS.get(k, k)} {d:+.3f}s" for d, k in diffs[:shown] if abs(d) > 1e-4) or \
        "no component differs"


def parse_layout(text: str) -> dict[str, Any]:
    """`--why-not "dp=8,tp_col=2,zero=1"` as search constraints; degrees not given are 1."""
    bad = [item for item in text.split(",") if item.strip() and "=" not in item]
    if bad:
        raise PlanError(f"--why-not {text!r}: {bad[0].strip()!r} is not key=value; give a layout like "
                        f"--why-not dp=8,tp_col=2,pp=1")
    given = candidates.parse_constraints([f"parallel.{item.strip()}" for item in text.split(",") if item.strip()])
    return {**{a: 1 for a in AXES}, **given}


def why_not(m: ModelSpec, c: Cluster, world: int, cons: dict[str, Any], gbs: int, seq: int, text: str,
            pick: Estimate) -> str:
    """Why the layout `text` (with the run's other constraints) is not the pick: rejected by the
    rules, does not fit, or how much slower and in which components."""
    layout = {**cons, **parse_layout(text)}
    head = f"why not {text}:"
    result = srch.search(m, c, world, layout, gbs, seq, top=1)
    if result.estimates:
        e = result.estimates[0]
        if e.plan == pick.plan:
            return f"{head} it is the pick"
        slower = e.step_time_s / pick.step_time_s - 1
        return (f"{head} its best plan ({' '.join(_changed(Plan(), e.plan)) or 'defaults'}) takes "
                f"{e.step_time_s:.3f}s, {slower:.1%} slower than the pick; differs most in "
                f"{component_diffs(pick, e)}")
    reasons, valid = rule_reasons(m, world, layout, gbs, seq)
    if not valid:
        return f"{head} rejected by the rules: {reasons}"
    found = leanest(m, c, world, layout, gbs, seq)
    if found is None:
        return f"{head} no knob choice passes the rules: {reasons}"
    plan, mem = found
    return (f"{head} does not fit even at its leanest (zero={plan.zero}, recompute={plan.recompute}, "
            f"mbs={plan.micro_batch_size}): {overflow(mem, c)}; try {', '.join(helpful_knobs(plan, mem))}")


def fitting_variant(m: ModelSpec, c: Cluster, plan: Plan, gbs: int, seq: int) -> Estimate | None:
    """The fastest plan of `plan`'s degrees that fits (other knobs searched), for the pinned error."""
    result = srch.search(m, c, plan.world_size, {a: getattr(plan, a) for a in AXES}, gbs, seq, top=1)
    return result.estimates[0] if result.estimates else None

