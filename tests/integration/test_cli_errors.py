"""One error style for every command: bad input is one line on stderr naming the setting (and the
fix), exit code 2, no traceback (only with --debug). Most cases call the commands' `main(argv)`
in-process; a few go through a real process, one of them failing on rank 0 after start-up."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from axon import checkpoints_cmd, cli, prepare_data, submit, train, tune
from tests.integration.together import run_together

ROOT = Path(__file__).resolve().parents[2]
FAST = ["model.n_layers=1", "train.seq_len=16", "train.global_batch_size=2", "logger.wandb.mode=disabled",
        "train.progress=false"]
SIX = [f"parallel.{a}=1" for a in ("pp", "cp", "tp_col", "tp_row", "tp_depth")]

CASES = [  # (main, argv, a piece of the one-line message)
    (train.main, ["model=llama3-70b"], "did you mean model=llama3.1-70b?"),
    (train.main, ["cluster=h100"], "did you mean cluster=dgx-h100?"),
    (train.main, ["cluster.node=16"], "did you mean cluster.nodes?"),
    (train.main, ["+train.stesp=5"], "did you mean train.steps?"),
    (train.main, ["+model.from_pretrained=x"], "unknown setting model.from_pretrained"),
    (train.main, ["train.steps=abc"], "train.steps=abc"),
    (train.main, ["model"], "'model' is not an override"),
    (train.main, ["trian.steps=3"], "did you mean train?"),
    (train.main, ["parallel=bogus"], "the parallel presets are auto, default"),
    (train.main, ["launch.nproc_per_node=4", "parallel.dp=3"], "parallel.dp"),
    (train.main, ["parallel.zero=4", "parallel.tp_col=2", "launch.nproc_per_node=2"], "parallel.zero=4"),
    (train.main, ["model.n_heads=5"], "model.n_heads=5"),
    (train.main, ["profile.steps=[5,3]"], "profile.steps"),
    (train.main, ["logger.tensorboard=true"], "logger.tensorboard=true"),
    (train.main, ["launch.nproc_per_node=2", "parallel.dp=2", "train.global_batch_size=3"], "train.global_batch_size"),
    (tune.main, ["model=llama3-70b"], "did you mean model=llama3.1-70b?"),
    (tune.main, ["cluster=h100"], "did you mean cluster=dgx-h100?"),
    (tune.main, ["cluster.node=16"], "did you mean cluster.nodes?"),
    (tune.main, ["--bogus"], "--bogus"),
    (tune.main, ["--top", "x"], "--top"),
    (tune.main, ["model=tiny", "parallel.dp=3", *SIX], "parallel.dp"),
    (submit.main, ["--dry", "model=llama3-70b"], "did you mean model=llama3.1-70b?"),
    (submit.main, ["--dry", "slurm.time=forever"], "slurm.time"),
    (submit.main, ["--dry", "slurm.nodes=0"], "slurm.nodes"),
    (submit.main, ["--dry", "slurm.tasks_per_node=1", "slurm.template=nope"], "slurm.template"),
    (submit.main, ["--dry", "slurm.tasks_per_node=4", "parallel.dp=3"], "parallel.dp"),
    (submit.main, ["--dry", "checkpoint.resume=never"], "checkpoint.resume"),
    (submit.main, ["--dry", "+slurm.nodez=2"], "did you mean slurm.nodes?"),
    (submit.main, ["--bogus"], "--bogus"),
    (prepare_data.main, [], "required"),
    (prepare_data.main, ["{tmp}/x.csv", "--out", "{tmp}/o"], ".txt or .jsonl"),
    (prepare_data.main, ["{tmp}/missing.txt", "--out", "{tmp}/o"], "missing.txt"),
    (prepare_data.main, ["{tmp}/a.txt", "--out", "{tmp}/o", "--tokenizer", "{tmp}/nope.json"], "nope.json"),
    (prepare_data.main, ["{tmp}/a.txt", "--out", "{tmp}/o", "--dtype", "int8"], "--dtype"),
    (checkpoints_cmd.main, ["{tmp}/nothere"], "does not exist"),
    (checkpoints_cmd.main, ["{tmp}"], "no checkpoints"),
    (checkpoints_cmd.main, ["--inspect", "{tmp}"], "no checkpoints"),
    (checkpoints_cmd.main, [], "required"),
    (cli.main, ["trian"], "did you mean axon train?"),
]


def test_at_least_thirty_bad_inputs_across_the_commands():
    assert len(CASES) >= 30
    assert {main.__module__ for main, _, _ in CASES} >= {"axon.train", "axon.tune", "axon.submit",
                                                         "axon.prepare_data", "axon.checkpoints_cmd"}


@pytest.mark.parametrize("main,argv,message", CASES, ids=[f"{m.__module__}:{' '.join(a)}" for m, a, _ in CASES])
def test_bad_input_is_one_line_and_exit_code_2(main, argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # nothing may land in the repository
    (tmp_path / "a.txt").write_text("hello")
    (tmp_path / "x.csv").write_text("a,b")
    assert main([a.format(tmp=tmp_path) for a in argv]) == 2
    out, err = capsys.readouterr()
    assert "Traceback" not in err and err.count("\n") == 1 and err.startswith("axon"), err
    assert message in err
    assert not (tmp_path / "runs").exists()  # failed before anything started


def test_debug_adds_the_traceback(capsys):
    assert tune.main(["--debug", "model=llama3-70b"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().endswith("did you mean model=llama3.1-70b?")


REAL = [  # (args, the message) of test_through_a_real_process
    (["tune", "model=llama3-70b"], "axon tune: model=llama3-70b is not a preset"),
    (["train", "cluster=h100"], "axon train: cluster=h100 is not a preset"),
    (["checkpoints", "/nonexistent/run"], "axon checkpoints: /nonexistent/run does not exist"),
]
VOCAB = "vocab"  # the key of test_data_vocab_beyond_the_model_is_one_line_before_start_up's process


@pytest.fixture(scope="module")
def real_processes(tmp_path_factory) -> dict:
    """Every real `python -m axon.cli` process of this module, started together and waited for:
    each spends seconds importing on one core, so side by side they take the time of about half of
    them on two. Key: tuple(args) or VOCAB; value: the finished process (returncode, stderr)."""
    run = tmp_path_factory.mktemp("vocab") / "run"
    # the embedded corpus is byte-tokenized: preflight (axon/preflight.py) refuses vocab 100
    argvs = {tuple(args): args for args, _ in REAL}
    argvs[VOCAB] = ["train", "model.vocab_size=100", "train.steps=1", f"run.dir={run}", *FAST]
    done = run_together({key: [sys.executable, "-m", "axon.cli", *args] for key, args in argvs.items()}, 300, cwd=ROOT)
    return done


@pytest.mark.parametrize("args,message", REAL)
def test_through_a_real_process(args, message, real_processes):
    p = real_processes[tuple(args)]
    assert p.returncode == 2 and p.stderr.strip() == p.stderr.strip().splitlines()[0]
    assert p.stderr.startswith(message) and "Traceback" not in p.stderr


def test_data_vocab_beyond_the_model_is_one_line_before_start_up(real_processes):
    p = real_processes[VOCAB]
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr
    line = [ln for ln in p.stderr.splitlines() if ln.startswith("axon train")]
    assert len(line) == 1 and line[0].startswith("axon train: ") and "model.vocab_size" in line[0]
