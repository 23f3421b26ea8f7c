"""Start N local workers when no launcher is around (`axon train launch.nproc_per_node=N`).

`run_local` runs N copies of `python -m <module> <argv>` with the torchrun variables (RANK,
WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, GROUP_RANK, MASTER_ADDR=127.0.0.1, MASTER_PORT), so the
workers detect themselves as `torchrun` and take the same path as under a real launcher. It
supervises them: when one exits non-zero or is killed, or on Ctrl-C / SIGTERM, the others get
SIGTERM (their whole process group), then SIGKILL after the grace period, and the exit code is
non-zero. Workers also die with the supervisor (Linux parent-death signal).

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

POLL_S = 0.05


class _StopRequest:
    """Ctrl-C or SIGTERM to the supervisor, recorded by a signal handler and acted on by the
    supervision loop. Never raised as an exception: one landing inside subprocess bookkeeping
    (Popen.poll) can leave Popen's wait lock held, and the later wait() then hangs forever."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None


def run_local(nproc: int, argv: list[str], module: str = "axon.train", master_port: int = 0,
              timeout_s: float = 30.0) -> int:
    """Run `nproc` local workers of `python -m module argv` to completion; returns the job's exit
    code (0 when every worker succeeded). `timeout_s` is the grace period survivors get between
    SIGTERM and SIGKILL once the job is being stopped."""
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
        _stop(procs, timeout_s)
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


def _supervise(procs: list[subprocess.Popen], grace_s: float, stop: _StopRequest) -> int:
    """Wait until all workers succeed (0), one fails (its code, after stopping the others) or the
    supervisor is told to stop (130 for Ctrl-C, 143 for SIGTERM; the caller stops the workers)."""
    while True:
        if stop.signum is not None:
            what = "interrupted" if stop.signum == signal.SIGINT else "SIGTERM"
            print(f"[axon] {what}: stopping {len(procs)} workers", file=sys.stderr, flush=True)
            return 128 + stop.signum
        codes = [p.poll() for p in procs]
        failed = [(rank, c) for rank, c in enumerate(codes) if c not in (None, 0)]
        if failed:
            rank, code = failed[0]
            how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
            print(f"[axon] rank {rank} {how}: stopping the other workers", file=sys.stderr, flush=True)
            _stop(procs, grace_s)
            return 128 - code if code < 0 else code
        if all(c == 0 for c in codes):
            return 0
        time.sleep(POLL_S)


def _stop(procs: list[subprocess.Popen], grace_s: float) -> None:
    """SIGTERM every live worker's process group, SIGKILL what is left after `grace_s`; reap all."""
    _signal_all(procs, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        time.sleep(POLL_S)
    _signal_all(procs, signal.SIGKILL)
    for p in procs:
        p.wait()


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
    """Record Ctrl-C / SIGTERM to the supervisor in `stop`; returns the undo function."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None  # signal handlers can only be set from the main thread

    def handler(signum: int, frame: object) -> None:
        stop.signum = signum

    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}

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
