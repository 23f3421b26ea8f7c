"""`axon submit` against a real one-node Slurm: a 2-task CPU job, submitted under a run name that
tries shell injection, is preempted, requeues itself, resumes with every step run exactly once,
completes and learns (one job for all of it: each start costs its tasks' torch imports, so 2 tasks:
the multi-task paths, srun's rendezvous and every rank's stop and requeue, are the same at 4)."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.slurm_fixture import local_slurm  # noqa: F401 - the fixture

# Most of a job's time is its processes importing torch, twice (the requeue); on a busy 2-core
# machine that alone can take minutes, hence the generous limit.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
# 2 ranks of a 2-layer tiny model on short sequences: ~0.1 s a step on 2 cores.
SMALL = ["model=tiny", "model.n_layers=2", "slurm.tasks_per_node=2", "parallel.dp=2", "train.global_batch_size=8",
         "train.seq_len=64", "train.lr=1e-2", "optim.warmup_steps=2", "train.progress=false", "logger.wandb.mode=disabled", "slurm.time=00:10:00",
         "slurm.signal_s=60"]
JOB_TIMEOUT_S = 400.0


def _submit(slurm, *overrides: str) -> str:
    done = subprocess.run([sys.executable, "-m", "axon.cli", "submit", *SMALL, *overrides], cwd=REPO,
                          env=slurm.env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _log(run_dir: Path, job_id: str) -> str:
    path = run_dir / f"slurm-{job_id}.out"
    return path.read_text(errors="replace") if path.is_file() else "(no log)"


def test_preempted_job_requeues_resumes_every_step_once_and_learns(local_slurm, tmp_path):
    run_dir = tmp_path / "run"
    steps = 24  # ~0.1 s a step: the time is in the two starts, not here; 24 still shows learning
    # The run name doubles as an injection attempt: it must reach Slurm and the trainer as text.
    job_id = _submit(local_slurm, "run.name='e2e; touch PWNED'", f"run.dir={run_dir}", f"train.steps={steps}")
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while len(_metrics(run_dir)) < 2 and time.monotonic() < deadline:  # training, handler installed
        assert local_slurm.job(job_id)["JobState"] in ("PENDING", "RUNNING"), _log(run_dir, job_id)
        time.sleep(0.1)  # signal early: at ~10 steps a second the preemption must land well before the end
    assert len(_metrics(run_dir)) >= 2, _log(run_dir, job_id)
    local_slurm.run("scancel", "--signal=USR1", job_id)  # what --signal=USR1@N sends at the time limit

    info = local_slurm.wait_job(job_id, ("COMPLETED",), JOB_TIMEOUT_S)
    log = _log(run_dir, job_id)
    assert info["JobState"] == "COMPLETED", f"{info.get('JobState')}\n{log}"
    assert info["Restarts"] == "1", log
    assert "(restart 1)" in log
    preempted_at = int(log.split("stopped by SIGUSR1 at step ")[1].split(" ")[0])
    assert 2 <= preempted_at < steps
    # The second run started from the preemption checkpoint: nothing lost, nothing repeated.
    assert json.loads((run_dir / "plan.json").read_text())["resumed_from_step"] == preempted_at
    records = _metrics(run_dir)
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    before, after = records[preempted_at - 1]["loss"], records[preempted_at]["loss"]
    assert abs(after - before) < 1.0, (before, after)  # resumed weights, not a fresh model
    losses = [r["loss"] for r in records]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses
    assert info["JobName"] == "e2e;"  # scontrol -o splits on spaces; the full name is checked below
    assert "Name=e2e; touch PWNED" in local_slurm.run("scontrol", "show", "job", job_id).stdout
    assert not (REPO / "PWNED").exists() and not (run_dir / "PWNED").exists()
    assert json.loads((run_dir / "submit.json").read_text())["job_id"] == job_id
    assert (run_dir / "config.yaml").is_file()
