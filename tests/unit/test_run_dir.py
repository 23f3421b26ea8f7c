"""Run-directory ownership (axon/run_dir.py): the run id is created once and kept; a directory
holding checkpoints is only continued (checkpoint.resume=auto), never overwritten by a new run;
checkpoints of another run are refused before any process starts; a live job locks its directory."""
from __future__ import annotations

import json
import multiprocessing as mp
from pathlib import Path

import pytest

from axon import checkpoint as ckpt
from axon.run_dir import RunDirError, RunLock, establish, preflight, read_id


def fake_checkpoint(run_dir: Path, step: int, run_id: str | None) -> Path:
    path = ckpt.step_dir(run_dir / "checkpoints", step)
    path.mkdir(parents=True)
    (path / ckpt.META).write_text(json.dumps({"step": step, **({"run_id": run_id} if run_id else {})}))
    return path


def test_run_id_is_created_once(tmp_path):
    assert read_id(tmp_path / "r") is None
    first = establish(tmp_path / "r")
    assert establish(tmp_path / "r") == first == read_id(tmp_path / "r") and len(first) == 32


def test_an_empty_or_fresh_directory_passes(tmp_path):
    for resume in ("auto", "never"):
        preflight(tmp_path / "new", resume)
    establish(tmp_path / "started")  # a run that crashed before its first checkpoint
    preflight(tmp_path / "started", "never")


def test_own_checkpoints_continue_only_with_resume_auto(tmp_path):
    run = tmp_path / "r"
    own = establish(run)
    fake_checkpoint(run, 5, own)
    fake_checkpoint(run, 10, own)
    preflight(run, "auto")
    preflight(run, str(run / "checkpoints" / "step_00000005"))  # an older checkpoint of this run
    with pytest.raises(RunDirError, match=r"steps 5-10\) .*checkpoint.resume=never.*checkpoint.resume=auto"):
        preflight(run, "never")
    with pytest.raises(RunDirError, match="choose a new run.name"):
        preflight(run, str(tmp_path / "elsewhere" / "step_00000001"))


def test_checkpoints_of_another_run_are_refused(tmp_path):
    run = tmp_path / "r"
    establish(run)
    fake_checkpoint(run, 30, "someone-else")  # copied in, or a second job with the same run.name
    with pytest.raises(RunDirError, match="not written by the run of"):
        preflight(run, "auto")
    legacy = tmp_path / "legacy"  # checkpoints but no run.json: nobody here owns them
    fake_checkpoint(legacy, 3, None)
    with pytest.raises(RunDirError, match="step_00000003"):
        preflight(legacy, "auto")


def _hold(run_dir: str, ready, release) -> None:
    lock = RunLock.acquire(Path(run_dir))
    ready.set()
    release.wait(30)
    lock.release()


def test_a_live_job_locks_its_directory(tmp_path):
    ctx = mp.get_context("fork")  # the holder only takes a file lock: no torch, no threads needed (5 s faster than spawn)
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold, args=(str(tmp_path), ready, release))
    holder.start()
    try:
        assert ready.wait(60)
        with pytest.raises(RunDirError, match=rf"in use by pid {holder.pid} on"):
            preflight(tmp_path, "auto")
    finally:
        release.set()
        holder.join(30)
    preflight(tmp_path, "auto")  # released (also when the holder is killed: the kernel drops flocks)
    RunLock.acquire(tmp_path).release()
