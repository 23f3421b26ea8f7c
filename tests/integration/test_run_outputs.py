"""What a run shows: MFU against the machine's real peak (<= 1 on local-cpu), smoothed and
per-device tokens/s beside the per-step figure, progress lines with ETA in a log, TensorBoard
scalars, a profiler trace of the requested steps, and `axon checkpoints` listing and inspecting
the checkpoint it wrote. One small one-process run serves every test (the last one, a refused
resume, runs `axon train`'s main in this process)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from axon import checkpoints_cmd

ROOT = Path(__file__).resolve().parents[2]
KEYS = ("step", "loss", "lr", "grad_norm", "tokens_per_s", "step_time_s", "host_cpu_s", "mfu", "peak_mem_bytes")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("outputs") / "run"
    p = subprocess.run([sys.executable, "-m", "axon.cli", "train", "cluster=local-cpu", "model.n_layers=2",
                        "train.seq_len=32", "train.global_batch_size=8", "train.steps=4", "logger.wandb.mode=disabled",
                        "logger.tensorboard.enabled=true", "profile.steps=[2,3]", f"run.dir={run_dir}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    return run_dir, p.stdout


def test_mfu_is_at_most_one_on_local_cpu_and_throughput_is_smoothed(run):
    run_dir, _ = run
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for r in records:
        assert set(KEYS) <= set(r)
        assert 0 < r["mfu"] <= 1.0
        assert r["host_cpu_s"] > 0  # the step's forward and backward ran in this process
        assert r["tokens_per_s_smooth"] > 0 and r["tokens_per_s_per_device"] == pytest.approx(r["tokens_per_s_smooth"])
    last = records[-1]  # the window's figure is total tokens over total time of the steps so far
    times = [r["step_time_s"] for r in records]
    assert last["tokens_per_s_smooth"] == pytest.approx(4 * 8 * 32 / sum(times), rel=1e-6)


def test_progress_lines_carry_elapsed_and_eta(run):
    _, stdout = run
    lines = [line for line in stdout.splitlines() if line.startswith("step ")]
    assert len(lines) == 4 and all("elapsed " in line and " eta " in line for line in lines)
    assert lines[-1].endswith("eta 0:00:00")


def test_tensorboard_event_file_is_written_and_readable(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _ = run
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert {"train/loss", "train/mfu", "train/tokens_per_s_smooth"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]


def test_profiler_trace_covers_the_requested_steps(run):
    run_dir, _ = run
    traces = list((run_dir / "profile").iterdir())
    assert [t.name for t in traces] == ["trace_rank0_steps2-3.json"]
    trace = json.loads(traces[0].read_text())
    assert trace["traceEvents"] and any("aten::" in str(e.get("name", "")) for e in trace["traceEvents"])


def test_checkpoints_lists_and_inspects(run, capsys, tmp_path):
    run_dir, _ = run
    assert checkpoints_cmd.main([str(run_dir), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["step"], r["valid"], r["world_size"]) for r in rows] == [(4, True, 1)]
    assert rows[0]["layout"].startswith("dp=1 pp=1") and rows[0]["bytes"] > 0
    assert checkpoints_cmd.main(["--inspect", rows[0]["path"]]) == 0
    text = capsys.readouterr().out
    assert "step 4" in text and "layout: dp=1 pp=1" in text
    assert "model.head.weight" in text and "256x128" in text  # keys and shapes from DCP's metadata
    broken = tmp_path / "run"
    shutil.copytree(run_dir / "checkpoints", broken / "checkpoints")
    for shard in (broken / "checkpoints").glob("*/*.distcp"):
        shard.write_bytes(b"")  # truncated
    assert checkpoints_cmd.main([str(broken), "--json"]) == 0
    row = json.loads(capsys.readouterr().out)[0]
    assert not row["valid"] and "truncated" in row["problem"]


def test_a_changed_batch_on_resume_is_one_line_before_start_up(run, monkeypatch, capsys):
    """`axon train`'s main in this process (a process start costs seconds of torch import; the real
    `python -m axon.cli` path of such a refusal is test_bad_inputs.test_cli_process), against the
    real checkpoint of the run: exit code 2, one line, and neither a local worker nor a rank started."""
    import launch.spawn
    from axon import train

    def started(*_a, **_k):
        raise AssertionError("a worker or rank started")

    monkeypatch.setattr(launch.spawn, "run_local", started)
    monkeypatch.setattr(train, "_run_rank", started)
    run_dir, _ = run  # resumes from step 4 with another batch: found by preflight, one line
    code = train.main(["cluster=local-cpu", "model.n_layers=2", "train.seq_len=32", "train.global_batch_size=16",
                       "train.steps=5", "logger.wandb.mode=disabled", f"run.dir={run_dir}"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("axon train")]
    assert len(lines) == 1 and lines[0].startswith("axon train: resumed run changes train.global_batch_size"), err
