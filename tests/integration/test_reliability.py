"""Reliability end to end on real processes (gloo): a SIGSTOPped rank fails the job in time with the
watchdog's report naming it; stop signals (TERM to a worker, USR1 to the local launcher) write a
checkpoint at a step boundary and exit non-zero, a worker is kill -9ed at a random moment, and the
run resumed after all that logs exactly an uninterrupted run's losses (one chain of runs, since
each start costs seconds of imports). Also the
watchdog alone (blocked main thread), the launcher's rule for a worker left running after another
finished, and the NCCL watchdog variables, without a GPU. The uninterrupted run, the blocked
watchdog and the supervisor of a worker left running run in the background while the stopped-rank
job waits ~15 s for its watchdog with idle cores (the `background` fixture); each is checked by its
own test."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from launch import dist as launch_dist
from launch.watchdog import MARGIN_S, STALL_EXIT, compact, rank_table
from tests.integration.local_workers import worker_pids

ROOT = Path(__file__).resolve().parents[2]
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
                 "MASTER_PORT", "TORCHELASTIC_USE_AGENT_STORE")
STEPS = 16
TRAIN = ["model=tiny", "model.n_layers=2", "train.seq_len=32", "train.global_batch_size=8",
         "parallel.micro_batch_size=2", "logger.wandb.mode=disabled", "train.progress=false",
         "launch.nproc_per_node=2", "parallel.dp=2", f"train.steps={STEPS}", "checkpoint.every=4"]
TIMEOUT_S = 10.0  # launch.timeout_s of the jobs below

pytestmark = pytest.mark.timeout(240)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in LAUNCHER_VARS and not k.startswith(("SLURM_", "PMI", "OMPI_", "MPI_", "MV2_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def _start(run: Path, *extra: str, stderr=subprocess.PIPE) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "axon.train", *TRAIN, f"launch.timeout_s={TIMEOUT_S:g}",
                             f"run.dir={run}", *extra], cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=stderr, text=True)


def _finish(job: subprocess.Popen, timeout: float = 150) -> tuple[int, str]:
    try:
        _, err = job.communicate(timeout=timeout)
    finally:
        if job.poll() is None:
            job.kill()
            job.communicate()
    return job.returncode, err


def _losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


def _steps_logged(run: Path) -> int:
    path = run / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def _wait_for_step(job: subprocess.Popen, run: Path, step: int, limit_s: float = 120) -> None:
    deadline = time.monotonic() + limit_s
    while _steps_logged(run) < step:
        assert job.poll() is None, job.stderr.read()
        assert time.monotonic() < deadline, f"step {step} never came"
        time.sleep(0.02)


def _workers(job: subprocess.Popen, n: int = 2) -> dict[int, int]:
    deadline = time.monotonic() + 60
    while len(ranks := worker_pids(job.pid)) < n:
        assert job.poll() is None and time.monotonic() < deadline, "the workers never started"
        time.sleep(0.02)
    return ranks


def _gone(pid: int) -> bool:
    try:
        return "\nState:\tZ" in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True


def _checkpoint_steps(run: Path) -> list[int]:
    return sorted(int(p.name.split("_")[1]) for p in (run / "checkpoints").glob("step_*") if (p / "axon.json").is_file())


class _Background:
    """A process started by the first test that has idle cores to give it (`start`, idempotent) and
    waited for by the test that checks it (`wait`: exit code, stdout, stderr, seconds from its
    start to its exit). Its output goes to files: a pipe nobody reads while it runs could fill up
    and block it."""

    def __init__(self, name: str, folder: Path, start) -> None:
        self.name, self._start, self.job = name, start, None
        self.out, self.err = folder / f"{name}.stdout", folder / f"{name}.stderr"
        self.exited_after: float | None = None

    def start(self) -> None:
        if self.job is None:
            with open(self.out, "w") as out, open(self.err, "w") as err:
                t0 = time.monotonic()
                self.job = self._start(out, err)
            threading.Thread(target=self._time_exit, args=(t0,), daemon=True).start()

    def _time_exit(self, t0: float) -> None:
        self.job.wait()
        self.exited_after = time.monotonic() - t0

    def wait(self, timeout: float = 150) -> tuple[int, str, str, float]:
        self.start()
        self.job.wait(timeout=timeout)
        deadline = time.monotonic() + 5  # the timing thread records the exit right after wait returns
        while self.exited_after is None and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.job.returncode, self.out.read_text(), self.err.read_text(), self.exited_after

    def close(self) -> None:
        if self.job is not None and self.job.poll() is None:
            self.job.kill()  # a training job's workers die with it (parent-death signal)
            self.job.wait()


BLOCKED_CODE = ("import sys, threading; from launch.watchdog import Watchdog; "
                "wd = Watchdog.start(0, 2, sys.argv[1], 0.5, heartbeat_s=1.0); wd.mark(3, 'grad-sync'); "
                "threading.Event().wait()")
STRAGGLER_CODE = """import subprocess, sys
from launch.spawn import _StopRequest, _supervise
procs = [subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
         for code in ("pass", "import time; time.sleep(120)")]
try:
    code = _supervise(procs, 0.5, _StopRequest())
    print(code, procs[1].poll() is not None)  # and stopped and reaped?
finally:
    for p in procs:
        p.kill()
        p.wait()
"""


@pytest.fixture(scope="module")
def background(tmp_path_factory: pytest.TempPathFactory):
    """The processes that only wait or only need idle cores, each started at most once: the
    uninterrupted run of TRAIN (its metrics in `folder / "base"`), a process whose main thread
    blocks under a watchdog (its status files in `folder / "blocked"`) and a supervisor of one
    finished and one running worker. test_stopped_rank_fails_the_job_in_time_naming_it starts them
    all while its cores idle for ~15 s before the watchdog fires; each is checked by its own test."""
    folder = tmp_path_factory.mktemp("reliability")
    (folder / "blocked").mkdir()
    py = [sys.executable, "-c"]
    jobs = {
        "base": _Background("base", folder, lambda out, err: _start(folder / "base", stderr=err)),
        "blocked": _Background("blocked", folder, lambda out, err: subprocess.Popen(
            [*py, BLOCKED_CODE, str(folder / "blocked")], cwd=ROOT, env=_env(), stdout=out, stderr=err, text=True)),
        "straggler": _Background("straggler", folder, lambda out, err: subprocess.Popen(
            [*py, STRAGGLER_CODE], cwd=ROOT, env=_env(), stdout=out, stderr=err, text=True)),
    }
    yield folder, jobs
    for job in jobs.values():
        job.close()


@pytest.mark.slow
def test_stopped_rank_fails_the_job_in_time_naming_it(tmp_path: Path, background) -> None:
    run = tmp_path / "run"
    job = _start(run, "train.steps=100000", "checkpoint.every=0")
    ranks = {}
    try:
        _wait_for_step(job, run, 2)
        ranks = _workers(job)
        os.kill(ranks[1], signal.SIGSTOP)
        t0 = time.monotonic()
        for other in background[1].values():  # idle cores until the watchdog fires: other tests' processes
            other.start()
        code, err = _finish(job, timeout=120)
        elapsed = time.monotonic() - t0
    finally:
        for pid in ranks.values():
            if not _gone(pid):
                os.kill(pid, signal.SIGKILL)
    assert code == STALL_EXIT, err[-3000:]
    assert elapsed < TIMEOUT_S + MARGIN_S + 10, f"the job took {elapsed:.0f} s to fail"
    assert err.count("[axon] watchdog: rank 0 made no progress") == 1, err[-3000:]
    assert "stalled longest: rank 1 " in err and "NOT RESPONDING" in err, err[-3000:]
    assert all(_gone(pid) for pid in ranks.values())  # the stopped worker was killed too


@pytest.mark.slow
def test_stops_and_a_kill_9_resume_exactly(tmp_path: Path, background) -> None:
    """One run, interrupted three times: SIGTERM to a worker, then SIGUSR1 to the local launcher
    (each: a checkpoint at a step boundary and the signal's exit code), then a kill -9 of a random
    worker at a random moment (seeded; possibly mid-checkpoint). Resumed to the end with
    checkpoint.resume=auto, it logs exactly the uninterrupted run's losses."""
    run = tmp_path / "run"
    folder, jobs = background
    jobs["base"].start()  # the uninterrupted run; a no-op when the previous test started it
    job = _start(run)
    _wait_for_step(job, run, 1)
    os.kill(_workers(job)[1], signal.SIGTERM)
    code, err = _finish(job)
    assert code == 128 + signal.SIGTERM, err[-3000:]
    first = _checkpoint_steps(run)[-1]
    assert 1 <= first < STEPS and f"stopped by SIGTERM at step {first} of {STEPS}" in err, err[-3000:]
    assert [s for s, _ in _losses(run)] == list(range(1, first + 1))  # stopped at a step boundary

    job = _start(run)  # checkpoint.resume=auto is the default
    _wait_for_step(job, run, first + 1)
    job.send_signal(signal.SIGUSR1)
    code, err = _finish(job)
    assert code == 128 + signal.SIGUSR1, err[-3000:]
    assert "SIGUSR1: passing it to 2 workers" in err
    second = _checkpoint_steps(run)[-1]
    assert first < second < STEPS - 1 and [s for s, _ in _losses(run)] == list(range(1, second + 1))

    rng = random.Random(21)
    victim, step, delay = rng.randrange(2), rng.randrange(second + 1, STEPS), rng.uniform(0.0, 0.3)
    job = _start(run)
    _wait_for_step(job, run, step)
    time.sleep(delay)
    workers = _workers(job)
    try:
        os.kill(workers[victim], signal.SIGKILL)
    except ProcessLookupError:
        pass  # it had finished already
    code, err = _finish(job)
    assert code in (0, 128 + signal.SIGKILL), err[-3000:]
    assert all(_gone(pid) for pid in workers.values())  # no worker left behind

    code, err = _finish(_start(run))
    assert code == 0, err[-3000:]
    code, _, err, _ = jobs["base"].wait()
    assert code == 0, err[-3000:]
    assert _losses(run) == _losses(folder / "base")


# ---- without training processes ----

def test_watchdog_ends_a_blocked_process_with_a_report(background) -> None:
    """The main thread blocks without marking: the watchdog prints its report and exits 124. (The
    process runs in the background, started while test_stopped_rank... waits; `elapsed` is from its
    start to its exit.)"""
    folder, jobs = background
    code, _, err, elapsed = jobs["blocked"].wait(timeout=60)
    assert code == STALL_EXIT, err
    assert elapsed < 0.5 + MARGIN_S + 10
    assert "rank 0 made no progress" in err and "step 3, phase grad-sync" in err
    assert "launch.timeout_s=0.5" in err and "no status file (never reached start-up): ranks 1" in err
    assert json.loads((folder / "blocked" / "rank0.json").read_text())["phase"] == "grad-sync"


def test_report_puts_the_silent_rank_first(tmp_path: Path) -> None:
    now = 1000.0
    statuses = {r: {"rank": r, "host": "h", "pid": 10 + r, "step": 7, "phase": "grad-sync", "idle_s": 0,
                    "progress_wall": now - 16, "wall": now - 0.5} for r in (0, 2, 3)}
    statuses[1] = {"rank": 1, "host": "h", "pid": 11, "step": 7, "phase": "forward-backward", "idle_s": 0,
                   "progress_wall": now - 15.5, "wall": now - 15}  # stopped: its watchdog went silent
    lines = rank_table(statuses, 5, now, 6.0, tmp_path)
    assert "rank 1 " in lines[1] and "NOT RESPONDING for 15 s" in lines[1]
    assert lines[-2].endswith("no status file (never reached start-up): ranks 4\n")
    assert "stalled longest: rank 1 on h (step 7 forward-backward, 16 s)" in lines[-1]
    assert compact([0, 1, 2, 5, 7, 8]) == "0-2, 5, 7-8"
    del statuses[1]  # rank 1 never started: it is the one named
    assert rank_table(statuses, 4, now, 6.0, tmp_path)[-1].endswith("stalled longest: ranks 1 (stopped or slow "
                                                                     "before start-up)\n")


def test_a_worker_left_running_after_another_finished_fails_the_job(background) -> None:
    """Rank 0 exits 0, rank 1 still runs launch.timeout_s + MARGIN_S later: STALL_EXIT, naming both.
    (`_supervise` runs in a process of its own in the background, see STRAGGLER_CODE.)"""
    code, out, err, _ = background[1]["straggler"].wait(timeout=120)
    assert code == 0, err
    assert out.split() == [str(STALL_EXIT), "True"], (out, err)  # and rank 1 was stopped and reaped
    assert "ranks [0] finished but ranks [1] still run" in err


def test_nccl_watchdog_variables() -> None:
    env = launch_dist.nccl_env({}, 30.0, Path("/run/status"))
    assert env == {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1", "TORCH_NCCL_ENABLE_MONITORING": "1",
                   "TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC": str(int(30 + MARGIN_S)), "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
                   "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": "/run/status/nccl_trace_rank_"}
    user = {"TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC": "900", "NCCL_ASYNC_ERROR_HANDLING": "3",
            "TORCH_FR_DUMP_TEMP_FILE": "/scratch/fr_"}
    kept = launch_dist.nccl_env(user, 30.0, Path("/run/status"))
    assert not set(kept) & {"TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC", "TORCH_NCCL_ASYNC_ERROR_HANDLING",
                            "TORCH_NCCL_DEBUG_INFO_TEMP_FILE"}
    assert launch_dist.collective_timeout(30.0) == 30.0 + 2 * MARGIN_S
