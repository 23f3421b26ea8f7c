"""Start N local workers when no launcher is around (`axon train launch.nproc_per_node=N`).

`run_local` runs N copies of `python -m <module> <argv>` with the torchrun variables (RANK,
WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, GROUP_RANK, MASTER_ADDR=127.0.0.1, MASTER_PORT), so the
workers detect themselves as `torchrun` and take the same path as under a real launcher. It
supervises them (`timeout_s` is launch.timeout_s):

- SIGTERM, SIGINT (Ctrl-C) or SIGUSR1 to the supervisor is passed on to every worker, which
  checkpoints at the next step boundary and exits 128 + the signal (axon/preempt.py); the
  supervisor waits up to `timeout_s` for that, then SIGKILLs what is left (at once on a second
  signal). Its exit code is 128 + the signal (143, 130, 138), or 0 if every worker had finished
  training anyway, or a worker's own failure code.
- A worker that exits non-zero or is killed fails the job with its code (128 + the signal when
  killed); the others get SIGTERM and, FAILED_GRACE_S later, SIGKILL (their collectives cannot
  complete anyway; a SIGSTOPped worker only dies by SIGKILL); `timeout_s` later when the code
  says it stopped for a signal of its own (STOP_CODES: the others are finishing the same checkpoint). A stalled worker ends itself with
  launch/watchdog.py's STALL_EXIT (124), which fails the job the same way.
- A worker that exits 0 while another still runs `timeout_s` + MARGIN_S later fails the job with
  STALL_EXIT, naming both.

Workers also die with the supervisor (Linux parent-death signal).

Output: rank 0 writes straight to this terminal (its progress bar redraws in place); every other
rank's stdout and stderr go, line by line and prefixed with `[rank N] `, to this stderr, so
they neither garble the bar nor mix with rank 0's stdout. Each worker gets
OMP_NUM_THREADS = max(1, cores // N) unless the variable is already set, so N workers sharing
few cores do not oversubscribe them.
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from typing import IO, Callable, Mapping, Optional

from launch.dist import free_port
from launch.watchdog import MARGIN_S, STALL_EXIT

POLL_S = 0.05
FAILED_GRACE_S = 3.0  # after a worker failed: SIGTERM to the others, SIGKILL this long after
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)  # "checkpoint and stop", passed to the workers
STOP_CODES = tuple(128 + sig for sig in STOP_SIGNALS)  # a worker's exit after such a checkpoint (axon/preempt.py)


class _StopRequest:
    """A stop signal to the supervisor, recorded by a signal handler and acted on by the
    supervision loop. Never raised as an exception: one landing inside subprocess bookkeeping
    (Popen.poll) can leave Popen's wait lock held, and the later wait() then hangs forever."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None  # the first stop signal
        self.count = 0  # how many arrived: a second one kills the workers at once


def run_local(nproc: int, argv: list[str], module: str = "axon.train", master_port: int = 0,
              timeout_s: float = 30.0) -> int:
    """Run `nproc` local workers of `python -m module argv` to completion; returns the job's exit
    code (0 when every worker succeeded; see the module docstring). `timeout_s` (launch.timeout_s)
    is how long workers get to checkpoint after a stop signal, and how long the others may run on
    after one worker finished."""
    if nproc < 1:
        raise ValueError(f"launch.nproc_per_node={nproc} must be >= 1")
    port = master_port or free_port("127.0.0.1")
    base = worker_env(os.environ, nproc, port)
    procs: list[subprocess.Popen] = []
    readers: list[threading.Thread] = []
    stop = _StopRequest()
    restore = _catch_stop_signals(stop)
    try:
        for rank in range(nproc):
            if stop.signum is not None:
                break
            env = dict(base, RANK=str(rank), LOCAL_RANK=str(rank))
            quiet = rank > 0  # ranks > 0 are piped and prefixed
            procs.append(subprocess.Popen(
                [sys.executable, "-m", module, *argv], env=env, start_new_session=True,
                stdout=subprocess.PIPE if quiet else None, stderr=subprocess.STDOUT if quiet else None,
                preexec_fn=_die_with_parent()))
        # Readers start only after every fork (preexec_fn is unsafe while other threads run).
        readers += [_start_prefixer(p.stdout, f"[rank {r}] ") for r, p in enumerate(procs) if r > 0]
        code = _supervise(procs, timeout_s, stop)
    finally:
        _stop(procs, min(timeout_s, FAILED_GRACE_S))  # a no-op unless supervision itself failed
        restore()
    for t in readers:
        t.join(timeout=5.0)
    return code


def worker_env(environ: Mapping[str, str], nproc: int, port: int) -> dict[str, str]:
    """The environment shared by all local workers (each adds its RANK and LOCAL_RANK)."""
    env = dict(environ)
    env.pop("TORCHELASTIC_USE_AGENT_STORE", None)  # no agent store here: rank 0 hosts the TCP store
    env.update(WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc), GROUP_RANK="0",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), PYTHONUNBUFFERED="1")
    env.setdefault("OMP_NUM_THREADS", str(max(1, _cores() // nproc)))
    return env


def _supervise(procs: list[subprocess.Popen], timeout_s: float, stop: _StopRequest) -> int:
    """Wait until all workers succeed (0), one fails (its code, after stopping the others), one
    finished long before another (STALL_EXIT) or the supervisor gets a stop signal (`_wind_down`)."""
    finished_at: Optional[float] = None  # when the first worker exited 0
    while True:
        if stop.signum is not None:
            return _wind_down(procs, timeout_s, stop)
        codes = [p.poll() for p in procs]
        failed = [(rank, c) for rank, c in enumerate(codes) if c not in (None, 0)]
        if failed:  # a worker stopped by a signal of its own: the others are writing the same checkpoint
            stopping = failed[0][1] in STOP_CODES
            return _fail(procs, *failed[0], grace_s=timeout_s if stopping else min(timeout_s, FAILED_GRACE_S))
        if all(c == 0 for c in codes):
            return 0
        if finished_at is None and 0 in codes:
            finished_at = time.monotonic()
        if finished_at is not None and time.monotonic() - finished_at > timeout_s + MARGIN_S:
            return _straggler(procs, codes, timeout_s)
        time.sleep(POLL_S)


def _wind_down(procs: list[subprocess.Popen], timeout_s: float, stop: _StopRequest) -> int:
    """Pass the stop signal to every worker and give them `timeout_s` to checkpoint and exit
    (less if a second signal arrives); 128 + the signal, 0 if all had finished training."""
    sig, seen = stop.signum, stop.count
    name, code = signal.Signals(sig).name, 128 + sig
    print(f"[axon] {name}: passing it to {len(procs)} workers, which checkpoint at the next step boundary; "
          f"SIGKILL in {timeout_s:g} s (launch.timeout_s) or on a second signal", file=sys.stderr, flush=True)
    _signal_workers(procs, sig)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and stop.count == seen:
        codes = [p.poll() for p in procs]
        failed = [(rank, c) for rank, c in enumerate(codes) if c not in (None, 0, code)]
        if failed:
            return _fail(procs, *failed[0], grace_s=min(timeout_s, FAILED_GRACE_S))
        if None not in codes:
            return 0 if all(c == 0 for c in codes) else code
        time.sleep(POLL_S)
    live = [rank for rank, p in enumerate(procs) if p.poll() is None]
    why = "a second stop signal" if stop.count != seen else f"still running {timeout_s:g} s after {name}"
    print(f"[axon] ranks {live}: {why}: killing them; raise launch.timeout_s if a checkpoint needs longer",
          file=sys.stderr, flush=True)
    _stop(procs, 0.0)
    return code


def _fail(procs: list[subprocess.Popen], rank: int, code: int, grace_s: float) -> int:
    """Worker `rank` exited with `code` (negative: killed by that signal): stop the others."""
    how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
    if code == STALL_EXIT:
        how += " (it made no progress for launch.timeout_s: see its watchdog report)"
    print(f"[axon] rank {rank} {how}: stopping the other workers", file=sys.stderr, flush=True)
    _stop(procs, grace_s)
    return 128 - code if code < 0 else code


def _straggler(procs: list[subprocess.Popen], codes: list[Optional[int]], timeout_s: float) -> int:
    """Some workers finished, others still run long after: stop them, fail the job."""
    done = [rank for rank, c in enumerate(codes) if c == 0]
    live = [rank for rank, c in enumerate(codes) if c is None]
    print(f"[axon] ranks {done} finished but ranks {live} still run {timeout_s + MARGIN_S:g} s later "
          f"(launch.timeout_s={timeout_s:g}): stopping them, exit code {STALL_EXIT}", file=sys.stderr, flush=True)
    _stop(procs, min(timeout_s, FAILED_GRACE_S))
    return STALL_EXIT


def _stop(procs: list[subprocess.Popen], grace_s: float) -> None:
    """SIGTERM every live worker, SIGKILL its whole process group after `grace_s` (this also ends
    a SIGSTOPped worker, which a SIGTERM cannot); reap all."""
    _signal_workers(procs, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        time.sleep(POLL_S)
    _signal_all(procs, signal.SIGKILL)
    for p in procs:
        p.wait()


def _signal_workers(procs: list[subprocess.Popen], sig: int) -> None:
    """`sig` to each live worker itself (not its children: SIGUSR1 would kill those)."""
    for p in procs:
        if p.poll() is None:
            try:
                os.kill(p.pid, sig)
            except ProcessLookupError:
                pass  # exited between poll and kill


def _signal_all(procs: list[subprocess.Popen], sig: int) -> None:
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, sig)  # the worker leads its own group (start_new_session)
            except ProcessLookupError:
                pass  # exited between poll and kill


def _start_prefixer(stream: IO[bytes], prefix: str) -> threading.Thread:
    def pump() -> None:
        for line in iter(stream.readline, b""):
            sys.stderr.write(prefix + line.decode(errors="replace").rstrip("\n") + "\n")
            sys.stderr.flush()
        stream.close()

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    return thread


def _catch_stop_signals(stop: _StopRequest) -> Callable[[], None]:
    """Record TERM / INT / USR1 to the supervisor in `stop`; returns the undo function."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None  # signal handlers can only be set from the main thread

    def handler(signum: int, frame: object) -> None:
        if stop.signum is None:
            stop.signum = signum
        stop.count += 1

    old = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}

    def restore() -> None:
        for sig, previous in old.items():
            signal.signal(sig, previous)

    return restore


def _die_with_parent() -> Optional[Callable[[], None]]:
    """A preexec_fn that makes the worker get SIGKILL when the supervisor dies (Linux only)."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved before fork
    parent = os.getpid()
    pr_set_pdeathsig = 1

    def preexec() -> None:
        prctl(pr_set_pdeathsig, signal.SIGKILL)
        if os.getppid() != parent:  # the supervisor died before prctl took effect
            os._exit(1)

    return preexec


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
