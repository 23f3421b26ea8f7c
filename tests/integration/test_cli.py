"""`axon train` end to end: a local multi-process run writes the run directory, bad layouts fail
before anything starts, every documented override key is accepted, and the same entry runs under
torchrun and mpiexec. (A killed or stopped rank of a training job: tests/integration/test_reliability.py.)"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from axon.config import freeze, load
from tests.integration.together import run_together

ROOT = Path(__file__).resolve().parents[2]
FAST = ["model.n_layers=2", "train.seq_len=32", "train.global_batch_size=8", "logger.wandb.mode=disabled",
        "train.progress=false"]


LOCAL, LAUNCHERS = "local", ("torchrun", "mpiexec")


def _outside_launcher_cmd(launcher: str, run: Path) -> list[str] | None:
    """The command of test_train_under_an_outside_launcher; None where mpiexec is not installed."""
    args = ["-m", "axon.train", "parallel.dp=2", "train.steps=2", f"run.dir={run}", *FAST]
    if launcher == "torchrun":
        from launch.dist import free_port

        return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                "--master-port", str(free_port("127.0.0.1")), *args]
    mpiexec = Path(sys.executable).parent / "mpiexec"
    return [str(mpiexec), "-n", "2", sys.executable, *args] if mpiexec.exists() else None


@pytest.fixture(scope="module")
def jobs(tmp_path_factory) -> dict:
    """The three training jobs of this module (local launcher, torchrun, mpiexec), started together
    and waited for: a job's start is mostly its processes importing torch, and phases of each
    leave a core idle that the others use. Key: LOCAL or the launcher; value: (the finished
    process, its run dir), or None for a launcher that is not installed."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    root = tmp_path_factory.mktemp("cli")
    cmds = {LOCAL: [sys.executable, "-m", "axon.cli", "train", "launch.nproc_per_node=2", "parallel.dp=2",
                    "train.steps=4", f"run.dir={root / LOCAL}", *FAST]}
    cmds.update({launcher: _outside_launcher_cmd(launcher, root / launcher) for launcher in LAUNCHERS})
    ran = run_together({key: cmd for key, cmd in cmds.items() if cmd is not None}, 300, cwd=ROOT, env=env)
    done: dict = {key: (ran[key], root / key) if key in ran else None for key in cmds}
    return done


def test_local_run_writes_the_run_directory(jobs):
    p, run = jobs[LOCAL]
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


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_train_under_an_outside_launcher(launcher, jobs):
    """The same entry under torchrun and under mpiexec (MPI env vars, mpi4py rendezvous)."""
    if jobs[launcher] is None:
        pytest.skip("mpiexec not installed in the environment (pip install mpich mpi4py)")
    p, run = jobs[launcher]
    assert p.returncode == 0, p.stderr[-3000:]
    plan = json.loads((run / "plan.json").read_text())
    assert plan["world_size"] == 2
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
