"""GEMM layout tuning's decisions (issue 16): per Linear shape, time the formulations of its three
GEMMs (kernels/gemm.py) once on the device, keep the fastest in a table, keep the table in files
across runs, and make every rank hold the same decisions.

    table = GemmTable(device_key(device))                    # untuned: torch's own formulations
    table.merge(GemmTable.load(path, table.device))          # decisions of an earlier run (JSON)
    table.tune({(tokens, out, in), ...}, device, dtype)      # times what is missing
    table.agree(group, device)                               # every rank keeps the same decisions
    table.save(path)                                         # atomically (tmp + os.replace)
    gemm.attach(model, table)                                # every Linear of `model` reads it
    table = for_run(mode, cache, run_dir, device, dtype, models, tokens, rank0)  # the above, for a run

A table entry is keyed by a Linear's (role, m=M tokens, n=N out, k=K in, dtype) (kernels/gemm.py:
the roles fwd / dx / dw and the formulations NN ... sTT), so one shape has three decisions; the
device (its name) and the torch version complete the key.

Decisions (`tune`): per missing (shape, role), every formulation runs `warmup` times, then the
median of `reps` timed runs, the formulations timed in turn (wall time between
torch.cuda.synchronize calls on CUDA; on CPU, the same code, timing the process's CPU time);
a formulation other than the default is chosen only when it beats the default's median by more
than `min_gain` in that round and again in a second round timing the two alone (noise must not
flip decisions between runs).

Files (JSON, never executed: `load` parses with json and accepts only the fields below, with
their types and ranges; anything else is refused with one line naming the file and the fix):
    {"format": "axon.gemm_table", "version": 1, "entries": [{"device": str, "torch": str,
     "role": "fwd"|"dx"|"dw", "m": int, "n": int, "k": int, "dtype": "float32"|..., "form": "TN"|...,
     "times_us": {form: float, ...}}]}   # times_us optional: what `tune` measured
The trainer (`for_run`) keeps the run's decisions in `<run dir>/gemm_tuning.json` and reuses
them across runs from the per-device cache file `cache_path(directory, device)` in model.gemm_cache
(default `<run dir>/../gemm_cache`, beside the other runs); only shapes neither file holds are
timed, before the first step.

Agreement (`agree`): ranks time on their own and could choose differently (and each rank may
hold other shapes: pipeline stages, the head), so decisions are all-gathered as an int64 tensor
(no pickled objects) and for each key the lowest rank's decision wins (rank 0's wherever rank 0
tuned that shape).
"""
from __future__ import annotations

import json
import math
import os
import platform
import re
import statistics
import time
from pathlib import Path
from typing import Iterable, Optional

import torch
import torch.distributed as dist
from torch import nn

from kernels.gemm import DEFAULT, FORMS, ROLES, attach, forward, input_grad, shapes, weight_grad

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
MODES = ("auto", "on", "off")  # model.gemm_tuning (perfmodel/rules.py validates it)
FORMAT, VERSION = "axon.gemm_table", 1
MAX_FILE_BYTES = 16 << 20  # a decision file is a few KB; anything near this is not one
RUN_FILE = "gemm_tuning.json"  # the run's decisions, in the run directory
Key = tuple[str, int, int, int, str]  # (role, m, n, k, dtype name)


class GemmTableError(ValueError):
    """A decision file that is not one (one line: the file, what is wrong, the fix)."""


def tuning_on(mode: str, device: torch.device) -> bool:
    """model.gemm_tuning: `auto` tunes on GPUs (CUDA / ROCm) and not on CPU."""
    if mode not in MODES:
        raise ValueError(f"model.gemm_tuning={mode!r} is not one of {MODES}")
    return mode == "on" or (mode == "auto" and device.type == "cuda")


def device_key(device: torch.device) -> str:
    """The name decisions are kept under: the GPU's name, or the CPU's model name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return "cpu " + line.split(":", 1)[1].strip()
    return "cpu " + (platform.processor() or platform.machine())


def cache_path(directory: Path, device: str, version: str = torch.__version__) -> Path:
    """The per-device cache file in `directory`: its name is made of the device name and torch
    version with every character outside [A-Za-z0-9._-] replaced, so it stays in `directory`."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{device}__torch{version}")
    return Path(directory) / f"gemm_{slug}.json"


def for_run(mode: str, cache: Optional[str], run_dir: Path, device: torch.device, dtype: torch.dtype,
            models: Iterable[nn.Module], tokens: int, rank0: bool,
            group: Optional[dist.ProcessGroup] = None) -> Optional[GemmTable]:
    """model.gemm_tuning for a run (None when it is off): the decisions of `<run_dir>/gemm_tuning.json`
    (a resumed run keeps its own) and of this device's cache file in `cache` (model.gemm_cache;
    None: `<run_dir>/../gemm_cache`), the Linear shapes of `models` at `tokens` rows that neither
    has timed in `dtype`, agreed over `group` (every rank calls this when torch.distributed is
    initialized; the exchange runs on `device`), written by rank 0 to the run file and merged
    into the cache file, and attached to every Linear of `models`."""
    if not tuning_on(mode, device):
        return None
    table = GemmTable(device_key(device))
    run_file = Path(run_dir) / RUN_FILE
    cache_file = cache_path(Path(cache) if cache else Path(run_dir).parent / "gemm_cache", table.device)
    table.merge(GemmTable.load(run_file, table.device))
    table.merge(GemmTable.load(cache_file, table.device))
    models = list(models)
    table.tune(set().union(*(shapes(m, tokens) for m in models)), device, dtype)
    if dist.is_initialized():
        table.agree(group, device)
    if rank0:
        table.save(run_file)
        table.merge(GemmTable.load(cache_file, table.device))  # what other runs added meanwhile
        table.save(cache_file)
    for m in models:
        attach(m, table)
    return table


# ---- the decision table ----
class GemmTable:
    """Decisions (role, m, n, k, dtype) -> formulation for one device and torch version; entries
    of other devices / versions read from a file are kept and written back, never used."""

    def __init__(self, device: str, version: str = torch.__version__):
        self.device, self.version = device, version
        self.entries: dict[tuple[str, str, Key], str] = {}  # (device, version, key) -> form
        self.times: dict[tuple[str, str, Key], dict[str, float]] = {}  # measured medians, microseconds

    def choice(self, role: str, m: int, n: int, k: int, dtype: torch.dtype) -> str:
        """The formulation for this shape on this device (the torch default when untuned)."""
        return self.entries.get((self.device, self.version, (role, m, n, k, dtype_name(dtype))), DEFAULT[role])

    def decisions(self) -> dict[Key, str]:
        """This device's decisions."""
        return {key: form for (dev, ver, key), form in self.entries.items() if (dev, ver) == (self.device, self.version)}

    def set(self, key: Key, form: str, times: Optional[dict[str, float]] = None) -> None:
        full = (self.device, self.version, key)
        self.entries[full] = form
        if times is not None:
            self.times[full] = times

    def merge(self, other: "GemmTable") -> int:
        """Take `other`'s entries this table lacks; returns how many."""
        new = [full for full in other.entries if full not in self.entries]
        for full in new:
            self.entries[full] = other.entries[full]
            if full in other.times:
                self.times[full] = other.times[full]
        return len(new)

    # ---- timing ----
    def tune(self, shapes: Iterable[tuple[int, int, int]], device: torch.device, dtype: torch.dtype,
             warmup: int = 2, reps: int = 5, min_gain: float = 0.03, forms: tuple[str, ...] = FORMS) -> int:
        """Time every formulation of every role of each Linear shape (tokens M, out N, in K) this
        table has no decision for, and record the fastest; returns how many decisions were made."""
        made = 0
        for m, n, k in sorted(set(shapes)):
            todo = [r for r in ROLES if (self.device, self.version, (r, m, n, k, dtype_name(dtype))) not in self.entries]
            if not todo:
                continue
            operands = [torch.randn(shape, device=device, dtype=dtype) for shape in ((m, k), (n, k), (m, n))]
            for role in todo:
                times = dict(zip(forms, medians_us([role_call(role, f, *operands) for f in forms], device,
                                                   warmup, reps)))
                best, default = min(times, key=lambda f: (times[f], f)), DEFAULT[role]
                if default in times and not self._faster(times[best], times[default], min_gain):
                    best = default
                if best != default and default in times:  # confirmed in a second round, the two alone
                    again = medians_us([role_call(role, f, *operands) for f in (default, best)], device, 1, reps)
                    best = best if self._faster(again[1], again[0], min_gain) else default
                self.set((role, m, n, k, dtype_name(dtype)), best, times)
                made += 1
            del operands  # before the next shape's are made
        return made

    @staticmethod
    def _faster(t: float, t_default: float, min_gain: float) -> bool:
        return t < (1 - min_gain) * t_default

    # ---- agreement across ranks ----
    def agree(self, group: Optional[dist.ProcessGroup] = None, device: torch.device = torch.device("cpu")) -> None:
        """Make every rank of `group` hold the same decisions for this device: all-gathered as
        int64 rows (`rows`) on `device` (the group's backend's device), then `adopt`ed.
        Collective: every rank of the group calls it."""
        rows = torch.tensor(self.rows(), dtype=torch.int64).reshape(-1, 6)  # [E, 6]
        world = dist.get_world_size(group)
        count = torch.tensor([rows.shape[0]], dtype=torch.int64, device=device)
        counts = [torch.empty_like(count) for _ in range(world)]
        dist.all_gather(counts, count, group=group)
        padded = torch.full((max(int(c) for c in counts), 6), -1, dtype=torch.int64, device=device)
        padded[:rows.shape[0]] = rows.to(device)
        gathered = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(gathered, padded, group=group)
        self.adopt([g[:int(c)].tolist() for g, c in zip(gathered, counts)])

    def rows(self) -> list[list[int]]:
        """This device's decisions as int rows (role, m, n, k, dtype, form), indices into
        ROLES / DTYPES / FORMS: what `agree` exchanges."""
        dtypes = list(DTYPES)
        return [[ROLES.index(r), m, n, k, dtypes.index(d), FORMS.index(f)]
                for (r, m, n, k, d), f in sorted(self.decisions().items())]

    def adopt(self, per_rank: list[list[list[int]]]) -> None:
        """Take the decisions of all ranks (`rows` of rank 0, 1, ..., in order): for each key the
        lowest rank's decision wins (rank 0's wherever rank 0 tuned that shape)."""
        dtypes, mine = list(DTYPES), self.decisions()
        agreed: dict[Key, str] = {}
        for rank_rows in reversed(per_rank):  # lower ranks overwrite
            for r, m, n, k, d, f in rank_rows:
                agreed[(ROLES[r], m, n, k, dtypes[d])] = FORMS[f]
        for key, form in agreed.items():
            if mine.get(key) != form:
                self.times.pop((self.device, self.version, key), None)  # measured for another choice
            self.entries[(self.device, self.version, key)] = form

    # ---- files ----
    def to_json(self) -> dict:
        entries = []
        for (dev, ver, (role, m, n, k, dt)), form in sorted(self.entries.items()):
            entry = {"device": dev, "torch": ver, "role": role, "m": m, "n": n, "k": k, "dtype": dt, "form": form}
            times = self.times.get((dev, ver, (role, m, n, k, dt)))
            if times is not None:
                entry["times_us"] = {f: round(t, 3) for f, t in times.items()}
            entries.append(entry)
        return {"format": FORMAT, "version": VERSION, "entries": entries}

    def save(self, path: Path) -> None:
        """Write the table to `path` atomically (a temporary file beside it, then os.replace)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        with open(tmp, "w") as f:
            json.dump(self.to_json(), f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path, device: str, version: str = torch.__version__) -> "GemmTable":
        """The table in `path` (JSON, checked field by field; GemmTableError if malformed), used
        for `device`; an absent file is an empty table."""
        table = cls(device, version)
        path = Path(path)
        if not path.exists():
            return table
        try:
            if path.stat().st_size > MAX_FILE_BYTES:
                raise ValueError(f"larger than {MAX_FILE_BYTES} bytes")
            data = json.loads(path.read_text(), parse_constant=_no_constant)
            for entry in _entries(data):
                key = (entry["role"], entry["m"], entry["n"], entry["k"], entry["dtype"])
                full = (entry["device"], entry["torch"], key)
                table.entries[full] = entry["form"]
                if "times_us" in entry:
                    table.times[full] = dict(entry["times_us"])
        except (OSError, UnicodeDecodeError, ValueError) as e:  # json.JSONDecodeError is a ValueError
            raise GemmTableError(f"{path} is not a GEMM decision table ({e}); delete it (the shapes are "
                                 f"tuned again) or set model.gemm_cache to another directory") from None
        return table


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number")


def _entries(data: object) -> list[dict]:
    """The checked entries of a parsed decision file (ValueError naming the first problem)."""
    if not isinstance(data, dict) or set(data) != {"format", "version", "entries"}:
        raise ValueError('expected an object with exactly "format", "version", "entries"')
    if data["format"] != FORMAT or data["version"] != VERSION:
        raise ValueError(f"format {data['format']!r} version {data['version']!r}, expected {FORMAT!r} {VERSION}")
    if not isinstance(data["entries"], list):
        raise ValueError('"entries" is not a list')
    required = {"device", "torch", "role", "m", "n", "k", "dtype", "form"}
    for i, e in enumerate(data["entries"]):
        if not isinstance(e, dict) or not required <= set(e) <= required | {"times_us"}:
            raise ValueError(f"entry {i} does not have exactly the fields {sorted(required)} (+ times_us)")
        bad = ([f for f in ("device", "torch") if not isinstance(e[f], str) or not 0 < len(e[f]) <= 200]
               + [f for f in ("m", "n", "k") if type(e[f]) is not int or e[f] < 1]
               + [f for f, allowed in (("role", ROLES), ("dtype", DTYPES), ("form", FORMS)) if e[f] not in allowed])
        times = e.get("times_us", {})
        if not isinstance(times, dict) or any(f not in FORMS or type(t) not in (int, float) or not math.isfinite(t)
                                              for f, t in times.items()):
            bad.append("times_us")
        if bad:
            raise ValueError(f"entry {i} has invalid {', '.join(bad)}")
    return data["entries"]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---- timing ----
def role_call(role: str, form: str, x: torch.Tensor, w: torch.Tensor, dy: torch.Tensor):
    """The GEMM of `role` by `form` as a call: x [M, K], w [N, K], dy [M, N]."""
    if role == "fwd":
        return lambda: forward(x, w, None, form)
    if role == "dx":
        return lambda: input_grad(dy, w, form)
    return lambda: weight_grad(dy, x, form)


def medians_us(calls: list, device: torch.device, warmup: int, reps: int) -> list[float]:
    """Median time in microseconds of each call over `reps` runs after `warmup`, the calls timed
    in turn (round-robin: a change of load hits them alike). On CUDA wall time between
    synchronizations; on CPU the process's CPU time (time.process_time: time the process spends
    descheduled on a shared machine does not count; spinning worker threads do)."""
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    for call in calls:
        for _ in range(warmup):
            call()
    times: list[list[float]] = [[] for _ in calls]
    for _ in range(reps):
        for call, samples in zip(calls, times):
            synchronize(device)
            t0 = clock()
            call()
            synchronize(device)
            samples.append((clock() - t0) * 1e6)
    return [statistics.median(samples) for samples in times]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
