"""Every bad input is refused before any process starts (issue 21): exit code 2, exactly one line
on stderr naming the setting, no worker started, no process group created, nothing on disk
changed. The table runs each command's `main(argv)` in-process; a few cases go through a real
`python -m axon.cli` process."""
from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch.distributed

from axon import prepare_data, submit, train, trainer, tune
from launch import spawn
from perfmodel.specs import ModelSpec
from tests.integration.together import run_together

ROOT = Path(__file__).resolve().parents[2]
N_TOKENS = 4000  # > one global batch of the defaults (16 x 129)


# ---- data files (the format of axon/prepare_data.py: raw tokens + a .json sidecar) ----
def _token_file(path: Path, tokens: np.ndarray, **meta_changes) -> None:
    path.write_bytes(tokens.tobytes())
    meta = {"format": "axon-tokens-v1", "dtype": tokens.dtype.name, "vocab_size": 256, "n_tokens": len(tokens),
            "max_token_id": int(tokens.max()) if len(tokens) else 0, "eot_id": 0, "tokenizer": "byte"}
    meta.update(meta_changes)
    path.with_suffix(".json").write_text(json.dumps(meta))


def _checkpoint(path: Path, sampler: dict, model: ModelSpec = ModelSpec(), run_id: str = "") -> None:
    path.mkdir(parents=True)
    meta = {"step": 5, "model": asdict(model), "sampler": sampler, **({"run_id": run_id} if run_id else {})}
    (path / "axon.json").write_text(json.dumps(meta))


def _fixtures(tmp: Path) -> None:
    rng = np.random.default_rng(0)
    good = rng.integers(1, 250, N_TOKENS).astype(np.uint16)
    _token_file(tmp / "good.bin", good)
    _token_file(tmp / "empty.bin", good[:0])
    (tmp / "odd.bin").write_bytes(good.tobytes()[:-1])
    (tmp / "odd.json").write_text(json.dumps({"dtype": "uint16"}))
    (tmp / "nosidecar.bin").write_bytes(good.tobytes())
    _token_file(tmp / "trunc.bin", good, n_tokens=N_TOKENS + 10)
    (tmp / "dir.bin").mkdir()
    _token_file(tmp / "bigvocab.bin", good, max_token_id=1000)
    _token_file(tmp / "falsemax.bin", good, max_token_id=False)
    _token_file(tmp / "negmax.bin", good, max_token_id=-1)
    _token_file(tmp / "int8.bin", good, dtype="int8")
    _token_file(tmp / "small.bin", good[:500])
    (tmp / "badjson.bin").write_bytes(good.tobytes())
    (tmp / "badjson.json").write_text("{not json")
    (tmp / "afile").write_text("x")
    state = {"seed": 1234, "seq_len": 128, "global_batch_size": 16, "n_tokens": 3945059}  # the corpus' train split
    _checkpoint(tmp / "ck_batch" / "step_00000005", {**state, "global_batch_size": 8})
    _checkpoint(tmp / "ck_seq" / "step_00000005", {**state, "seq_len": 64})
    _checkpoint(tmp / "ck_model" / "step_00000005", state, ModelSpec(d_model=256))
    own = tmp / "resumed"  # a run directory with its own checkpoint (checkpoint.resume=auto)
    _checkpoint(own / "checkpoints" / "step_00000005", {**state, "global_batch_size": 8}, run_id="r1")
    (own / "run.json").write_text(json.dumps({"run_id": "r1"}))
    (tmp / "a.txt").write_text("hello world\n")
    (tmp / "empty.jsonl").write_text("")
    (tmp / "bad.jsonl").write_text("not json\n")
    (tmp / "nofield.jsonl").write_text('{"body": "x"}\n')
    (tmp / "latin1.txt").write_bytes(b"caf\xe9\n")
    (tmp / "tok.json").write_text("{bad")
    (tmp / "in.txt").mkdir()


T, U, S, P = "train", "tune", "submit", "prepare-data"
MAIN = {T: train.main, U: tune.main, S: submit.main, P: prepare_data.main}
SLURM = ["--dry", "slurm.tasks_per_node=1"]  # a CPU dry run: nothing queued

CASES = [  # (command, argv ({tmp} = the test's directory), a piece of the one line: the setting)
    # ---- train: ranges declared on the frozen config types ----
    (T, ["train.steps=-5"], "train.steps=-5"),
    (T, ["train.global_batch_size=0"], "train.global_batch_size=0"),
    (T, ["train.seq_len=0"], "train.seq_len=0"),
    (T, ["train.lr=-1"], "train.lr=-1"),
    (T, ["train.lr=inf"], "train.lr=inf"),
    (T, ["train.lr=nan"], "train.lr=nan"),
    (T, ["train.seed=-1"], "train.seed=-1"),
    (T, ["train.log_every=0"], "train.log_every=0"),
    (T, ["train.dtype=fp8"], "train.dtype='fp8'"),
    (T, ["train.on_nonfinite=ignore"], "train.on_nonfinite"),
    (T, ["train.max_skips=-1"], "train.max_skips=-1"),
    (T, ["train.goldfish.k=1"], "train.goldfish.k=1"),
    (T, ["train.goldfish.k=4", "train.goldfish.h=0"], "train.goldfish.h=0"),
    (T, ["train.goldfish.k=4", "train.goldfish.mode=random"], "train.goldfish.mode"),
    (T, ["optim.name=sgd"], "optim.name='sgd'"),
    (T, ["optim.beta1=1.0"], "optim.beta1=1.0"),
    (T, ["optim.beta2=2"], "optim.beta2=2"),
    (T, ["optim.eps=0"], "optim.eps=0"),
    (T, ["optim.weight_decay=-0.1"], "optim.weight_decay=-0.1"),
    (T, ["optim.grad_clip=-1"], "optim.grad_clip=-1"),
    (T, ["optim.warmup_steps=-1"], "optim.warmup_steps=-1"),
    (T, ["optim.min_lr_ratio=1.5"], "optim.min_lr_ratio=1.5"),
    (T, ["data.val_fraction=1.0"], "data.val_fraction=1.0"),
    (T, ["data.val_fraction=-0.1"], "data.val_fraction=-0.1"),
    (T, ["data.dtype=int8"], "data.dtype='int8'"),
    (T, ["launch.nproc_per_node=0"], "launch.nproc_per_node=0"),
    (T, ["launch.timeout_s=0"], "launch.timeout_s=0"),
    (T, ["launch.timeout_s=-5"], "launch.timeout_s=-5"),
    (T, ["launch.master_port=70000"], "launch.master_port=70000"),
    (T, ["launch.backend=mpi"], "launch.backend='mpi'"),
    (T, ["checkpoint.every=-1"], "checkpoint.every=-1"),
    (T, ["checkpoint.keep=-1"], "checkpoint.keep=-1"),
    (T, ["logger.wandb.mode=cloud"], "logger.wandb.mode='cloud'"),
    (T, ["model.d_model=0"], "model.d_model=0"),
    (T, ["model.n_layers=0"], "model.n_layers=0"),
    (T, ["model.vocab_size=0"], "model.vocab_size=0"),
    (T, ["model.norm_eps=0"], "model.norm_eps=0"),
    (T, ["model.rope_theta=-1"], "model.rope_theta=-1"),
    (T, ["cluster.nodes=0"], "cluster.nodes=0"),
    (T, ["cluster.hbm_bytes=0"], "cluster.hbm_bytes=0"),
    (T, ["cluster.compute_efficiency=2"], "cluster.compute_efficiency=2"),
    (T, ["cluster.float8_linears=true"], "cluster.float8_linears=true"),
    (T, ["cluster.async_tp=true"], "cluster.async_tp=true"),
    (T, ["cluster.float8_speedup=0.5"], "cluster.float8_speedup=0.5"),
    (T, ["train.seq_len=2048"], "train.seq_len=2048"),
    (T, ["parallel.zero=5"], "parallel.zero=5"),
    (T, ["launch.nproc_per_node=2", "optim.beta2=2"], "optim.beta2=2"),
    # ---- train: backend (launch/dist.py) ----
    (T, ["launch.backend=nccl"], "launch.backend=nccl"),
    # ---- train: run directory ----
    (T, ["run.name=../escape", "run.dir=null"], "run.name='../escape'"),
    (T, ["run.name=/abs/name", "run.dir=null"], "run.name='/abs/name'"),
    (T, ["run.name=job%j", "run.dir=null"], "run.name='job%j'"),
    (T, ["run.name=''", "run.dir=null"], "run.name=''"),
    (T, ["run.dir={tmp}/run%j"], "run.dir="),
    (T, ["run.dir={tmp}/afile"], "run.dir="),
    (T, ["run.dir={tmp}/afile/sub"], "run.dir="),
    # ---- train: data files ----
    (T, ["data.path={tmp}/missing.bin"], "data.path="),
    (T, ["data.path={tmp}/missing"], "data.path="),
    (T, ["data.path={tmp}/dir.bin"], "data.path="),
    (T, ["data.path={tmp}"], "data.path="),
    (T, ["data.path={tmp}/empty.bin"], "data.path="),
    (T, ["data.path={tmp}/odd.bin"], "data.path="),
    (T, ["data.path={tmp}/nosidecar.bin"], "data.path="),
    (T, ["data.path={tmp}/trunc.bin"], "data.path="),
    (T, ["data.path={tmp}/bigvocab.bin"], "model.vocab_size=256"),
    (T, ["data.path={tmp}/falsemax.bin"], "max_token_id=False"),
    (T, ["data.path={tmp}/negmax.bin"], "max_token_id=-1"),
    (T, ["data.path={tmp}/int8.bin"], "dtype='int8'"),
    (T, ["data.path={tmp}/badjson.bin"], "data.path="),
    (T, ["data.path={tmp}/good.bin", "data.dtype=uint32"], "data.dtype=uint32"),
    (T, ["data.path={tmp}/small.bin"], "train.global_batch_size"),
    (T, ["data.path=null", "data.tokenizer={tmp}/tok.json"], "data.tokenizer"),
    (T, ["train.global_batch_size=1000000000"], "train.global_batch_size"),
    (T, ["launch.nproc_per_node=2", "parallel.dp=2", "data.path={tmp}/odd.bin"], "data.path="),
    (T, ["launch.nproc_per_node=2", "parallel.dp=2", "data.path={tmp}/bigvocab.bin"], "model.vocab_size"),
    # ---- train: resume ----
    (T, ["checkpoint.resume={tmp}/nowhere"], "checkpoint.resume="),
    (T, ["checkpoint.resume={tmp}/ck_batch"], "train.global_batch_size"),
    (T, ["checkpoint.resume={tmp}/ck_seq"], "train.seq_len"),
    (T, ["checkpoint.resume={tmp}/ck_model/step_00000005"], "model.d_model"),
    (T, ["run.dir={tmp}/resumed"], "train.global_batch_size"),
    (T, ["run.dir={tmp}/resumed", "checkpoint.resume=never"], "checkpoint.resume"),
    # ---- train: memory (the performance model, never an allocation) ----
    (T, ["model.d_model=1048576"], "parallel.zero"),
    (T, ["model.n_layers=20000", "model.d_model=4096", "model.n_heads=32", "model.n_kv_heads=8",
         "model.d_ff=14336"], "GiB per rank"),
    # ---- tune ----
    (U, ["--top", "0"], "--top"),
    (U, ["--out", "{tmp}/nodir/plan.yaml"], "--out"),
    (U, ["--out", "{tmp}"], "--out"),
    (U, ["--plot", "{tmp}/afile/p.png"], "--plot"),
    (U, ["parallel.dp=0"], "parallel.dp=0"),
    (U, ["parallel.zero=7"], "parallel.zero=7"),
    (U, ["parallel.schedule=bogus"], "parallel.schedule"),
    (U, ["train.seq_len=100000"], "train.seq_len=100000"),
    (U, ["cluster.gpus_per_node=0"], "cluster.gpus_per_node=0"),
    (U, ["optim.beta2=2"], "optim.beta2=2"),
    # ---- submit ----
    (S, [*SLURM, "run.name=../x", "run.dir=null"], "run.name="),
    (S, [*SLURM, "run.dir={tmp}/logs%j"], "run.dir="),
    (S, [*SLURM, "run.dir={tmp}/afile"], "run.dir="),
    (S, [*SLURM, "slurm.nodes=0"], "slurm.nodes=0"),
    (S, [*SLURM, "slurm.time=soon"], "slurm.time="),
    (S, [*SLURM, "data.path={tmp}/missing.bin"], "data.path="),
    (S, [*SLURM, "train.lr=-1"], "train.lr=-1"),
    (S, ["--dry", "cluster=perlmutter", "slurm.tasks_per_node=1", "model.d_model=1048576"], "GiB per rank"),
    # ---- prepare-data ----
    (P, ["{tmp}/missing.txt", "--out", "{tmp}/o/x"], "missing.txt"),
    (P, ["{tmp}/a.md", "--out", "{tmp}/o/x"], ".txt or .jsonl"),
    (P, ["{tmp}/in.txt", "--out", "{tmp}/o/x"], "in.txt"),
    (P, ["{tmp}/empty.jsonl", "--out", "{tmp}/o/x"], "empty.jsonl"),
    (P, ["{tmp}/bad.jsonl", "--out", "{tmp}/o/x"], "bad.jsonl:1"),
    (P, ["{tmp}/nofield.jsonl", "--out", "{tmp}/o/x"], "--field"),
    (P, ["{tmp}/latin1.txt", "--out", "{tmp}/o/x"], "latin1.txt"),
    (P, ["{tmp}/a.txt", "--out", "{tmp}/afile/x"], "--out"),
    (P, ["{tmp}/a.txt", "--out", "{tmp}/dir.bin"], "--out"),
    (P, ["{tmp}/a.txt", "--out", "{tmp}/o/x", "--tokenizer", "{tmp}/tok.json"], "--tokenizer"),
    (P, ["{tmp}/a.txt", "--out", "{tmp}/o/x", "--tokenizer", "{tmp}/none.json"], "none.json"),
    (P, ["{tmp}/a.txt", "--out", "{tmp}/o/x", "--dtype", "int8"], "--dtype"),
    (P, ["{tmp}/a.txt", "--out", "{tmp}/o/x", "--eot-token", "X"], "eot token"),
]


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under root with its size and modification time."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


def _refuse(*_: object, **__: object) -> None:
    raise AssertionError("a worker or process group was started for bad input")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("bad_inputs")
    _fixtures(tmp)
    return tmp


@pytest.mark.parametrize("command,argv,setting", CASES, ids=[f"{c}:{' '.join(a)}"[:80] for c, a, _ in CASES])
def test_refused_before_start(command, argv, setting, data_dir, monkeypatch, capsys):
    tmp = data_dir
    for target in ((spawn, "run_local"), (trainer, "run"), (torch.distributed, "init_process_group")):
        monkeypatch.setattr(*target, _refuse)
    monkeypatch.setattr(submit.subprocess, "run", _refuse)  # no sbatch
    monkeypatch.chdir(tmp)  # runs/<name> would land here
    args = [a.replace("{tmp}", str(tmp)) for a in argv]
    if command == T and not any(a.startswith("run.dir=") for a in args):
        args.append(f"run.dir={tmp}/run")
    before = _tree(tmp)
    code = MAIN[command](args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1, err
    assert setting.replace("{tmp}", str(tmp)) in err[0], err[0]
    assert "Traceback" not in err[0]
    assert _tree(tmp) == before


def test_table_size():
    assert len(CASES) >= 80
    assert {c for c, _, _ in CASES} == {T, U, S, P}


def test_unreadable_checkpoint_is_exit_code_3(data_dir, monkeypatch, capsys):
    """A checkpoint that is there but unreadable is not a setting: exit code 3, as in the workers."""
    bad = data_dir / "ck_corrupt" / "step_00000001"
    bad.mkdir(parents=True, exist_ok=True)
    (bad / "axon.json").write_text("{torn")
    monkeypatch.setattr(spawn, "run_local", _refuse)
    monkeypatch.setattr(trainer, "run", _refuse)
    code = train.main([f"checkpoint.resume={bad}", f"run.dir={data_dir}/run"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 3 and len(err) == 1 and "axon.json" in err[0], err


def test_good_inputs_pass_the_checks(data_dir):
    """The same files and settings, corrected, pass every pre-spawn check."""
    from axon import preflight
    from axon.config import freeze, load

    cfg, info = train.resolve_plan(freeze(load([f"data.path={data_dir}/good.bin", f"run.dir={data_dir}/run"])),
                                   1, [])
    preflight.check(cfg, 1, info["estimate"], local_ranks=8)


CLI_CASES = [  # (argv, the setting) of test_cli_process
    (["train", "optim.beta2=2"], "optim.beta2=2"),
    (["train", "launch.nproc_per_node=2", "parallel.dp=2", "data.path={tmp}/trunc.bin"], "data.path="),
    (["prepare-data", "{tmp}/missing.txt", "--out", "{tmp}/o/x"], "missing.txt"),
]


@pytest.fixture(scope="module")
def cli_processes(data_dir) -> tuple[dict, dict, dict]:
    """The real processes of test_cli_process, started together (each spends seconds importing on
    one core; side by side on two they take about half the time) and waited for: tuple(argv) ->
    the finished process, and the tree of data_dir before they started and after all finished."""
    argvs = {}
    for argv, _ in CLI_CASES:
        args = [a.replace("{tmp}", str(data_dir)) for a in argv]
        if args[0] == "train":
            args.append(f"run.dir={data_dir}/run")
        argvs[tuple(argv)] = args
    before = _tree(data_dir)
    done = run_together({key: [sys.executable, "-m", "axon.cli", *args] for key, args in argvs.items()}, 120,
                        cwd=data_dir, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return done, before, _tree(data_dir)


@pytest.mark.parametrize("argv,setting", CLI_CASES)
def test_cli_process(argv, setting, cli_processes):
    """Through a real `python -m axon.cli` process: one line, exit code 2, nothing written (by any
    of the three: they run side by side)."""
    results, before, after = cli_processes
    done = results[tuple(argv)]
    err = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert len(err) == 1 and setting in err[0], err
    assert after == before


def test_unwritable_run_dir(data_dir, monkeypatch, capsys):
    """A run.dir this user cannot write (faked: the tests may run as root, who can write anywhere)."""
    from axon import preflight

    monkeypatch.setattr(spawn, "run_local", _refuse)
    monkeypatch.setattr(trainer, "run", _refuse)
    monkeypatch.setattr(preflight.os, "access", lambda *_: False)
    before = _tree(data_dir)
    code = train.main([f"run.dir={data_dir}/ro/run"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "run.dir=" in err[0] and "not writable" in err[0], err
    assert _tree(data_dir) == before
