"""Pipeline schedules: bubble fraction and peak in-flight activations.

Closed forms (DESIGN.md section 4; the zero-bubble and controllable-memory papers), with
F = B = W for the zero-bubble family. The bubble fraction is bubble time / total pipeline time.
Peak activations are in units of one microbatch's activations of one whole pipeline stage (all
its layers, all its virtual chunks), on the rank that holds the most and on the rank that holds
the head (which also keeps the logits).

When `perfmodel/schedule_tables.json` (written from the simulator of parallel/schedules.py)
holds the exact (schedule, pp, microbatches, virtual_stages) entry, its numbers win.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

TABLES = Path(__file__).resolve().parent / "schedule_tables.json"
V_SHAPED = ("zbv", "vhalf", "vmin")  # two chunks per rank in a V: virtual_stages must be 2


@dataclass(frozen=True)
class ScheduleCost:
    bubble_fraction: float
    peak_activations: float  # stage-microbatch units, max over ranks
    source: str  # "closed-form" or "table"
    head_activations: float = 1.0  # units on the rank holding the last chunk (the head; rank 0 in a V)


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
        return ScheduleCost(_fraction(p - 1, m), float(m), "closed-form", float(m))
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


@lru_cache(maxsize=4)
def _load_tables(path: str, mtime: float) -> dict[tuple[str, int, int, int], ScheduleCost]:
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); regenerate it with the schedule simulator "
                         f"(parallel/schedule_sim.py) or delete it to use the closed forms") from None
    if data.get("version") != 1:
        raise ValueError(f"{path}: unsupported schedule table version {data.get('version')!r}; regenerate it")
    out = {}
    for e in data["entries"]:
        key = (e["schedule"], int(e["pp"]), int(e["microbatches"]), int(e["virtual_stages"]))
        peaks = e["peak_activations"]
        head = peaks[0] if key[0] in V_SHAPED else peaks[-1]
        out[key] = ScheduleCost(float(e["bubble_fraction"]), float(max(peaks)), "table", float(head))
    return out


def tables(path: Path = TABLES) -> dict[tuple[str, int, int, int], ScheduleCost]:
    """The simulator's tables (empty when the file is absent); reloaded when the file changes."""
    if not path.exists():
        return {}
    return _load_tables(str(path), path.stat().st_mtime)


def schedule_cost(schedule: str, pp: int, m: int, v: int = 1,
                  table: dict[tuple[str, int, int, int], ScheduleCost] | None = None) -> ScheduleCost:
    """The table entry when there is one (`table` defaults to the simulator's file), else the closed form."""
    hit = (tables() if table is None else table).get((schedule, pp, m, v))
    return hit if hit is not None else closed_form(schedule, pp, m, v)


def p2p_per_microbatch(schedule: str, v: int) -> int:
    """Activation sends per rank per microbatch in each direction (one per chunk boundary)."""
    return 2 if schedule in V_SHAPED else max(1, v)


def valid_virtual_stages(schedule: str, v: int) -> str | None:
    """None when `v` suits `schedule`, else the reason (naming the setting to change)."""
    if schedule in V_SHAPED and v != 2:
        return f"parallel.schedule={schedule} is V-shaped: set parallel.virtual_stages=2 (got {v})"
    if schedule == "interleaved" and v < 2:
        return "parallel.schedule=interleaved needs parallel.virtual_stages >= 2 (or use schedule=1f1b)"
    if schedule not in V_SHAPED and schedule != "interleaved" and v != 1:
        return f"parallel.schedule={schedule} runs one chunk per rank: set parallel.virtual_stages=1"
    return None
