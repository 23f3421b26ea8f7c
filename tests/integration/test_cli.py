"""`axon train` end to end: a local multi-process run writes the run directory, bad layouts fail
before anything starts, every documented override key is accepted, and the same entry runs under
torchrun and mpiexec. (A killed or stopped rank of a training job: tests/integration/test_reliability.py.)"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from axon.config import freeze, load

ROOT = Path(__file__).resolve().parents[2]
FAST = ["model.n_layers=2", "train.seq_len=32", "train.global_batch_size=8", "logger.wandb.mode=disabled",
        "train.progress=false"]


def axon(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "axon.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_local_run_writes_the_run_directory(tmp_path):
    run = tmp_path / "run"
    p = axon("train", "launch.nproc_per_node=2", "parallel.dp=2", "train.steps=4", f"run.dir={run}", *FAST)
    assert p.returncode == 0, p.stderr
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_s", "step_time_s", "mfu", "peak_mem_bytes"):
        assert key in records[0]
    plan = json.loads((run / "plan.json").read_text())
    assert plan["plan"]["dp"] == 2 and plan["world_size"] == 2
    assert plan["estimate"]["memory"]["total"] > 0 and plan["estimate"]["step_time_s"] > 0
    assert "train:" in (run / "config.yaml").read_text()
    assert (run / "checkpoints" / "step_00000004" / "axon.json").is_file()


@pytest.mark.parametrize("args,message", [
    (["launch.nproc_per_node=4", "parallel.dp=3"], "parallel.dp"),
    (["parallel.zero=4", "parallel.tp_col=2", "launch.nproc_per_node=2"], "parallel.zero=4 must be 0, 1, 2 or 3"),
    (["parallel.pp=2", "parallel.dp=2", "parallel.schedule=zbv", "parallel.virtual_stages=1",
      "launch.nproc_per_node=4"], "set parallel.virtual_stages=2"),
    (["launch.nproc_per_node=2", "parallel.dp=2", "train.global_batch_size=3"], "train.global_batch_size"),
    (["model.n_heads=5"], "model.d_model=128 is not divisible by model.n_heads=5"),
    (["parallel.bogus=1"], "bogus"),
])
def test_bad_layouts_fail_before_starting(args, message, monkeypatch, capsys):
    """In this process (the real `python -m axon.cli` path is tests/integration/test_bad_inputs.py
    `test_cli_process`): exit code 2 and the message, and neither local workers nor a rank started."""
    import launch.spawn
    from axon import train

    def started(*_a, **_k):
        raise AssertionError("a worker or rank started")

    monkeypatch.setattr(launch.spawn, "run_local", started)
    monkeypatch.setattr(train, "_run_rank", started)
    code = train.main(list(args))
    err = capsys.readouterr().err
    assert code == 2 and message in err, err


def test_documented_override_keys():
    keys = ["model=gpt2-124m", "model.n_layers=4", "model.d_model=256", "model.n_heads=8", "model.n_kv_heads=4",
            "model.d_ff=512", "model.vocab_size=512", "parallel.dp=2", "parallel.pp=1", "parallel.cp=1",
            "parallel.tp_col=1", "parallel.tp_row=1", "parallel.tp_depth=1", "parallel.zero=0",
            "parallel.schedule=1f1b", "parallel.micro_batch_size=2", "train.global_batch_size=32",
            "train.seq_len=64", "train.steps=7", "train.lr=0.001", "train.seed=3", "launch.nproc_per_node=2",
            "launch.backend=gloo", "run.name=x", "run.dir=/tmp/x", "checkpoint.every=5", "checkpoint.keep=3",
            "checkpoint.resume=never", "logger.wandb.mode=offline"]
    cfg = freeze(load(keys))
    assert cfg.model.n_layers == 4 and cfg.model.norm == "layernorm"  # preset then field override
    assert cfg.plan.dp == 2 and cfg.plan.micro_batch_size == 2
    assert cfg.train.steps == 7 and cfg.train.global_batch_size == 32 and cfg.launch.backend == "gloo"
    assert cfg.run_dir == Path("/tmp/x") and cfg.checkpoint.resume == "never"
    assert cfg.logging.wandb_mode == "offline"
    for preset in ("tiny", "gpt2-124m", "llama3-8b", "llama3.1-70b", "llama3.1-405b"):
        freeze(load([f"model={preset}"])).model.check()


@pytest.mark.parametrize("launcher", ["torchrun", "mpiexec"])
def test_train_under_an_outside_launcher(launcher, tmp_path):
    """The same entry under torchrun and under mpiexec (MPI env vars, mpi4py rendezvous)."""
    run = tmp_path / "run"
    args = ["-m", "axon.train", "parallel.dp=2", "train.steps=2", f"run.dir={run}", *FAST]
    if launcher == "torchrun":
        from launch.dist import free_port

        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--master-port", str(free_port("127.0.0.1")), *args]
    else:
        mpiexec = Path(sys.executable).parent / "mpiexec"
        if not mpiexec.exists():
            pytest.skip("mpiexec not installed in the environment (pip install mpich mpi4py)")
        cmd = [str(mpiexec), "-n", "2", sys.executable, *args]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    plan = json.loads((run / "plan.json").read_text())
    assert plan["world_size"] == 2
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
