"""A run directory's identity and ownership: `run.json` names the run that owns the directory's
checkpoints, and `.lock` keeps a second job out while one runs.

    preflight(cfg)                  # before any process starts: read-only checks, one line each
    run_id = establish(run_dir)     # rank 0 at start-up: the id in run.json (created when missing)
    lock = RunLock.acquire(run_dir) # rank 0, for the whole run

Every checkpoint carries its run's id (axon/checkpoint.py); `checkpoint.keep` pruning and
`checkpoint.resume=auto` only see this run's, so two runs can never delete or resume each
other's. A directory holding checkpoints is continued only with `checkpoint.resume=auto` (the
default); a new run (`checkpoint.resume=never`, or fine-tuning from another checkpoint) refuses it.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any, Optional

from axon import checkpoint as ckpt
from axon.metrics import write_json_atomic

RUN_FILE = "run.json"
LOCK_FILE = ".lock"


class RunDirError(ValueError):
    """The run directory belongs to another run or job; the message names the fix."""


def read_id(run_dir: Path) -> Optional[str]:
    """The run id recorded in `run_dir`, None for a directory no run has started in."""
    path = run_dir / RUN_FILE
    if not path.is_file():
        return None
    try:
        return str(json.loads(path.read_text())["run_id"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RunDirError(f"{path} is unreadable ({e}); delete it only if {run_dir} holds no checkpoints "
                          f"you want to keep") from e


def establish(run_dir: Path) -> str:
    """The run id of `run_dir` (rank 0 only): the recorded one, or a new one written atomically."""
    found = read_id(run_dir)
    if found is not None:
        return found
    run_id = uuid.uuid4().hex
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_dir / RUN_FILE, {"run_id": run_id, "created": time.time(), "host": socket.gethostname()})
    return run_id


def preflight(run_dir: Path, resume: str) -> None:
    """Refuse a directory whose checkpoints this run would not continue, or that a live job holds."""
    _check_unlocked(run_dir)
    root = run_dir / "checkpoints"
    found = ckpt.complete_checkpoints(root)
    if not found:
        return
    theirs = ckpt.foreign_checkpoints(root, read_id(run_dir))
    steps = f"{_step(found[0])}-{_step(found[-1])}"
    fix = (f"continue it with checkpoint.resume=auto, choose another run.name (or run.dir), or delete {root}")
    if resume == "never":
        raise RunDirError(f"run.dir {run_dir} holds checkpoints (steps {steps}) of an earlier run and "
                          f"checkpoint.resume=never would start a new run over them; {fix}")
    if resume == "auto":
        if theirs:
            raise RunDirError(f"{root} holds {len(theirs)} checkpoint(s) not written by the run of {run_dir} "
                              f"(e.g. {theirs[-1].name}); move them away, or resume from one explicitly with "
                              f"checkpoint.resume=<path> in a new run.name")
        return
    inside = Path(resume).resolve().is_relative_to(root.resolve())
    if not inside:
        raise RunDirError(f"run.dir {run_dir} holds checkpoints (steps {steps}) of another run; to start "
                          f"from checkpoint.resume={resume} choose a new run.name (or run.dir), or delete {root}")


class RunLock:
    """An exclusive flock on `<run dir>/.lock`, released when the process ends (even by kill -9).
    On a file system without flock support (some Lustre mounts) the lock is skipped."""

    def __init__(self, fd: int):
        self.fd = fd

    @classmethod
    def acquire(cls, run_dir: Path, probe: bool = False) -> "RunLock":
        """Take the lock, writing this process into the file for the next one's error; `probe`:
        a shared lock only, so every rank of a job can check at once that no job holds it."""
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if probe else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another job"
            os.close(fd)
            raise RunDirError(f"run.dir {run_dir} is in use by {holder}; wait for it, or choose another "
                              f"run.name (or run.dir)") from None
        except OSError:  # no flock on this file system: nothing to hold
            os.close(fd)
            return cls(-1)
        if not probe:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        return cls(fd)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing drops the flock
            self.fd = -1


def _check_unlocked(run_dir: Path) -> None:
    if (run_dir / LOCK_FILE).is_file():
        RunLock.acquire(run_dir, probe=True).release()


def _step(path: Path) -> Any:
    return int(path.name[len(ckpt.PREFIX):]) if path.name[len(ckpt.PREFIX):].isdigit() else path.name
