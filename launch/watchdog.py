"""Per-rank progress watchdog: a rank that makes no progress for `launch.timeout_s` ends itself.

The process-group timeout only bounds collectives that notice it; a rank stuck elsewhere (a peer
SIGSTOPped during start-up, a hung teardown, a stuck kernel) could hold the job forever. Each rank
therefore runs one daemon thread, started before the process group exists:

    wd = Watchdog.start(rank, world_size, status_dir, timeout_s)
    wd.mark(step, "forward-backward")      # cheap: one attribute write, no I/O, no lock
    ...
    wd.stop()

Every `heartbeat_s` (a live but waiting rank keeps writing, so it is told apart from a stopped
one; never faster, so thousands of ranks do not flood a shared file system) the thread writes
`<status_dir>/rank<N>.json` atomically: rank, host, pid, step, phase, seconds since the last progress, wall times. When no mark
has arrived for `timeout_s + MARGIN_S`, the thread prints one report to stderr (the first rank to
fire lists every rank's status file, the ranks that stalled longest first; a stopped rank cannot
write, but its last state and age are there) and ends the process with `os._exit(STALL_EXIT)`;
that works while the main thread is blocked inside a C++ collective. As a backstop for C++ code
that never releases the GIL, `faulthandler` (a C thread) dumps every thread's stack and exits
with code 1 if even the watchdog thread cannot run for `timeout_s + 3 * MARGIN_S`.
"""
from __future__ import annotations

import faulthandler
import json
import os
import socket
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Optional, TextIO

STALL_EXIT = 124  # exit code of a rank (and of the local launcher's job) that made no progress in time
MARGIN_S = 5.0  # past launch.timeout_s, so a collective's own timeout error comes first when it can
POLL_S = 1.0  # how often the thread looks at the progress
# the status file is rewritten every heartbeat (timeout_s / 4, within [POLL_S, 30] s), not on every
# change: at thousands of ranks one small write per rank per second would load a shared file system
REPORT_ROWS = 8  # ranks listed one per line in the report; the rest are summarised by state
REPORT_CLAIM = "report.claim"  # in the status dir: the first rank to create it prints the full table


class NullWatchdog:
    """The watchdog's API for code paths that run without one (tests, single-process tools)."""

    last_step = 0

    def mark(self, step: int, phase: str) -> None:
        pass

    def stop(self) -> None:
        pass


class Watchdog:
    """One rank's watchdog; see the module docstring. Create it with `Watchdog.start`."""

    def __init__(self, rank: int, world_size: int, status_dir: Path, timeout_s: float,
                 heartbeat_s: Optional[float] = None, stream: TextIO = sys.stderr) -> None:
        self.rank, self.world_size, self.status_dir = rank, world_size, Path(status_dir)
        self.timeout_s = float(timeout_s)
        self.limit_s = self.timeout_s + MARGIN_S
        self.heartbeat_s = heartbeat_s if heartbeat_s is not None else min(max(self.timeout_s / 4, POLL_S), 30.0)
        self.stream = stream
        self.started_wall = time.time()
        self._last = (0, "start", time.monotonic())  # (step, phase, monotonic time): written by mark()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"axon-watchdog-rank{rank}", daemon=True)

    @classmethod
    def start(cls, rank: int, world_size: int, status_dir: Path, timeout_s: float,
              heartbeat_s: Optional[float] = None) -> "Watchdog":
        wd = cls(rank, world_size, status_dir, timeout_s, heartbeat_s)
        try:
            wd.status_dir.mkdir(parents=True, exist_ok=True)
        except OSError:
            pass  # no status files then (see _write); the timeout still works
        wd._write(wd._last, time.monotonic())
        wd._thread.start()
        return wd

    def mark(self, step: int, phase: str) -> None:
        """Progress: this rank is now at `step` (the optimizer steps done), doing `phase`."""
        self._last = (step, phase, time.monotonic())  # one attribute store: atomic under the GIL

    @property
    def last_step(self) -> int:
        """The step of the last mark."""
        return self._last[0]

    def stop(self) -> None:
        """Stop watching: the thread ends, then the backstop is cancelled (so it cannot be re-armed)."""
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10 * POLL_S)
        faulthandler.cancel_dump_traceback_later()

    # ---- the thread ----
    def _loop(self) -> None:
        written, written_at = self._last, time.monotonic()
        self._arm_backstop()
        while not self._stopped.wait(POLL_S):
            last, now = self._last, time.monotonic()
            if now - last[2] > self.limit_s:
                self._fire(last, now)
            if last != written:
                self._arm_backstop()
            if now - written_at >= self.heartbeat_s:
                written_at = now
                self._write(last, now)
            written = last

    def _arm_backstop(self) -> None:
        faulthandler.dump_traceback_later(self.limit_s + 2 * MARGIN_S, exit=True, file=self.stream)

    def _write(self, last: tuple[int, str, float], now: float) -> None:
        try:
            write_status(self.status_dir, status_record(self.rank, last, now))
        except OSError:
            pass  # a full or vanished run dir must not end the rank; the timeout still works

    def _fire(self, last: tuple[int, str, float], now: float) -> None:
        self._write(last, now)
        first = claim_report(self.status_dir / REPORT_CLAIM, self.started_wall)
        text = stall_report(self, last, now, read_statuses(self.status_dir) if first else None)
        try:
            self.stream.write(text)
            self.stream.flush()
        finally:
            os._exit(STALL_EXIT)


# ---- status files ----
def status_record(rank: int, last: tuple[int, str, float], now: float) -> dict:
    """What rank `rank` is doing: its step and phase, seconds since that progress, wall times."""
    step, phase, at = last
    wall = time.time()
    return {"rank": rank, "host": socket.gethostname(), "pid": os.getpid(), "step": step, "phase": phase,
            "idle_s": round(now - at, 3), "progress_wall": wall - (now - at), "wall": wall}


def write_status(status_dir: Path, record: dict) -> None:
    """`<status_dir>/rank<N>.json`, replaced atomically (readers never see half a file)."""
    path = status_dir / f"rank{record['rank']}.json"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path)


def read_statuses(status_dir: Path) -> dict[int, dict]:
    """rank -> its last status record (unreadable or torn files are skipped)."""
    out = {}
    for path in Path(status_dir).glob("rank*.json"):
        try:
            record = json.loads(path.read_text())
            out[int(record["rank"])] = record
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return out


def claim_report(path: Path, since_wall: float) -> bool:
    """Whether this rank is the first of its job to fire (it then prints the full table). A claim
    older than this rank's watchdog is a previous run's and is replaced."""
    for _ in range(2):
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return True
        except FileExistsError:
            try:
                if os.stat(path).st_mtime >= since_wall:
                    return False
                os.unlink(path)
            except FileNotFoundError:
                pass
        except OSError:
            return True  # cannot tell: better two tables than none
    return False


# ---- the report ----
def stall_report(wd: Watchdog, last: tuple[int, str, float], now: float,
                 statuses: Optional[dict[int, dict]]) -> str:
    """The text printed when `wd` fires; with `statuses`, a table of every rank's state."""
    step, phase, at = last
    head = (f"[axon] watchdog: rank {wd.rank} made no progress for {now - at:.0f} s (step {step}, phase {phase}), "
            f"more than launch.timeout_s={wd.timeout_s:g} + {MARGIN_S:g} s: exiting with code {STALL_EXIT}; "
            f"find why the stalled rank below stopped, or raise launch.timeout_s if a phase legitimately "
            f"takes longer\n")
    lines = [head, f"[axon]   rank {wd.rank} main thread at: {main_thread_where()}\n"]
    if statuses is None:
        return "".join(lines)
    # a file written before any rank of this job can have started is a previous job's: no file
    current = {r: s for r, s in statuses.items() if s["wall"] >= wd.started_wall - wd.limit_s}
    return "".join(lines + rank_table(current, wd.world_size, time.time(), 2 * wd.heartbeat_s + POLL_S,
                                      wd.status_dir))


def rank_table(statuses: dict[int, dict], world_size: int, now_wall: float, silent_after_s: float,
               status_dir: Path) -> list[str]:
    """Report lines: the ranks that stalled longest first (silent ones, whose watchdog stopped
    writing, before live ones waiting on them), then a count per state and the ranks with no file."""
    def silent(r: dict) -> float:
        return now_wall - r["wall"]

    def age(r: dict) -> float:
        return now_wall - r["progress_wall"]

    ranked = sorted(statuses.values(), key=lambda r: (silent(r) <= silent_after_s, -age(r), r["rank"]))
    missing = [r for r in range(world_size) if r not in statuses]
    out = [f"[axon]   what every rank was doing (from {status_dir}), stalled longest first:\n"]
    for r in ranked[:REPORT_ROWS]:
        state = (f"NOT RESPONDING for {silent(r):.0f} s (stopped, hung or dead)" if silent(r) > silent_after_s
                 else "alive, waiting")
        out.append(f"[axon]     rank {r['rank']:<5} host {r['host']} pid {r['pid']}: step {r['step']} "
                   f"{r['phase']}, last progress {age(r):.0f} s ago, {state}\n")
    if len(ranked) > REPORT_ROWS:
        counts: dict[tuple, int] = {}
        for r in ranked[REPORT_ROWS:]:
            counts[(r["step"], r["phase"])] = counts.get((r["step"], r["phase"]), 0) + 1
        out += [f"[axon]     ... {n} more at step {s} {p}\n" for (s, p), n in sorted(counts.items())]
    if missing:
        out.append(f"[axon]     no status file (never reached start-up): ranks {compact(missing)}\n")
    if ranked and (silent(ranked[0]) > silent_after_s or not missing):
        worst = ranked[0]
        out.append(f"[axon]   stalled longest: rank {worst['rank']} on {worst['host']} (step {worst['step']} "
                   f"{worst['phase']}, {age(worst):.0f} s)\n")
    elif missing:
        out.append(f"[axon]   stalled longest: ranks {compact(missing)} (stopped or slow before start-up)\n")
    return out


def compact(ranks: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    parts, start = [], None
    for i, r in enumerate(ranks):
        if start is None:
            start = r
        if i + 1 == len(ranks) or ranks[i + 1] != r + 1:
            parts.append(str(start) if start == r else f"{start}-{r}")
            start = None
    return ", ".join(parts)


def main_thread_where() -> str:
    """The main thread's innermost Python frames, 'file:line function' innermost last."""
    frame = sys._current_frames().get(threading.main_thread().ident)
    if frame is None:
        return "unknown"
    stack = traceback.extract_stack(frame)[-3:]
    return " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(stack))
