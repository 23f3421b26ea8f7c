"""`axon submit` rendering: golden batch scripts per cluster preset, quoting that survives bash,
sbatch and Hydra, the plan recorded for parallel=auto, and errors that name the setting.

Regenerate the golden files after an intended template change with
    python -m tests.integration.test_slurm_render --update
and review the diff.
"""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from axon import submit
from axon.config import freeze, load
from axon.submit import SubmitError, build_job, render, time_limit_s
from perfmodel.specs import PlanError

GOLDEN = Path(__file__).resolve().parent / "golden"
PYTHON = "/opt/axon/.venv/bin/python"
WORKDIR = Path("/home/user/axon")
INJECTION = "x; rm -rf ~ $(touch pwned) `id` \"q\" it's"

CASES: dict[str, list[str]] = {
    "perlmutter": ["cluster=perlmutter", "slurm.nodes=2", "slurm.account=m1234", "model=tiny", "parallel.dp=8",
                   "run.name=pm-tiny"],
    "frontier": ["cluster=frontier", "slurm.nodes=2", "slurm.account=abc123", "slurm.time=02:00:00",
                 "slurm.rocm=6.2.4", "slurm.net_plugin=/lustre/orion/abc123/aws-ofi-rccl/lib",
                 "model=tiny", "parallel.dp=16", "run.name=frontier-tiny"],
    "alps": ["cluster=alps", "slurm.nodes=2", "slurm.account=a-csstaff", "slurm.partition=normal", "model=tiny",
             "parallel.dp=8", "run.name=alps-tiny", "slurm.uenv=prgenv-gnu/24.11:v1"],
    "generic": ["cluster=dgx-h100", "slurm.partition=gpu", "slurm.qos=high", "slurm.requeue=false",
                "slurm.extra_sbatch=['--mail-type=END','--exclusive']",
                "slurm.setup=['module load cuda/12.4','source /opt/venv/bin/activate']",
                "model=tiny", "parallel.dp=8", "run.dir=/scratch/runs/dgx", "train.steps=500"],
    "local-cpu": ["slurm.tasks_per_node=4", "model=tiny", "parallel.dp=4", "train.steps=20", "run.name=cpu"],
    "injection": ["slurm.tasks_per_node=4", "model=tiny", "parallel.dp=4",
                  f"run.name=\"{INJECTION.replace(chr(34), chr(92) + chr(34))}\"",
                  "run.dir=/scratch/runs/inj", "data.path='/data/$(reboot)/a b.bin'"],
}


def _job(overrides: list[str]) -> submit.SlurmJob:
    return build_job(load(overrides), overrides, python=PYTHON, workdir=WORKDIR)


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden(case):
    assert render(_job(CASES[case])) == (GOLDEN / f"{case}.sbatch").read_text()


def test_every_cluster_preset_has_a_golden_script():
    presets = {p.stem for p in (Path(submit.__file__).parents[1] / "configs" / "cluster").glob("*.yaml")}
    covered = {_job(o).template for o in CASES.values()}
    assert presets, "no cluster presets found: the configs/cluster path moved"
    assert all(submit.template_name(load([f"cluster={p}"])) in covered for p in presets)


def _fake_bin(tmp_path: Path, name: str, body: str) -> None:
    path = tmp_path / "bin" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_injection_reaches_the_trainer_as_text(tmp_path):
    """Run the rendered script with bash (srun and scontrol faked): the trainer's argv is exactly
    the overrides, nothing runs, and Hydra parses them back to the submitted values."""
    job = _job(CASES["injection"])
    script = tmp_path / "job.sbatch"
    script.write_text(render(job))
    _fake_bin(tmp_path, "srun", f'for a in "$@"; do printf "%s\\0" "$a"; done > "{tmp_path}/argv"')
    _fake_bin(tmp_path, "scontrol", "echo node01")
    env = {"PATH": f"{tmp_path}/bin:/usr/bin:/bin", "HOME": str(tmp_path / "home"), "SLURM_JOB_ID": "1",
           "SLURM_JOB_NODELIST": "node[01-02]"}
    done = subprocess.run(["bash", str(script)], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    argv = (tmp_path / "argv").read_text().split("\0")[:-1]
    trainer_args = argv[argv.index("axon.train") + 1:]
    assert trainer_args == [*job.overrides, "run.dir=/scratch/runs/inj", "checkpoint.resume=auto"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["argv", "bin", "job.sbatch"]  # nothing ran
    cfg = load(trainer_args)
    assert cfg.run.name == INJECTION
    assert cfg.run.dir == "/scratch/runs/inj"
    assert cfg.data.path == "/data/$(reboot)/a b.bin"


def test_header_values_keep_their_text_under_sbatch_quoting():
    # sbatch reads '#SBATCH' arguments with shell-like quoting; shlex.quote output is what it expects
    script = render(_job(CASES["injection"]))
    assert "#SBATCH --job-name='x; rm -rf ~ $(touch pwned) `id` \"q\" it'\"'\"'s'" in script


def test_auto_plan_is_recorded_as_explicit_overrides():
    from axon.train import resolve_plan

    overrides = ["cluster=perlmutter", "slurm.nodes=2", "model=tiny", "parallel=auto", "parallel.micro_batch_size=2"]
    job = _job(overrides)
    cfg = freeze(load(overrides))
    expected = resolve_plan(cfg, 8, overrides)[0].plan  # the same choice `axon train parallel=auto` makes
    assert job.plan == expected.to_dict() and job.plan["micro_batch_size"] == 2
    assert job.estimate is not None
    parallel = [o for o in job.overrides if o.startswith("parallel")]
    assert parallel == submit.plan_overrides(expected)  # the user's parallel=auto and constraint replaced
    rerun = freeze(load(list(job.overrides)))  # what the job's trainer will see
    assert rerun.plan == expected and not rerun.auto_plan


@pytest.mark.parametrize("overrides, match", [
    (["slurm.account='a\nrm -rf ~'"], "slurm.account=.*line break"),
    (["slurm.extra_sbatch=['mail-type=END']"], r"slurm.extra_sbatch\[0\]"),
    (["slurm.time=00:01:00", "slurm.signal_s=120"], "slurm.signal_s=120 must be shorter than slurm.time"),
    (["slurm.time=1h"], "slurm.time='1h' is not a Slurm time limit"),
    (["checkpoint.resume=never"], "checkpoint.resume=never cannot be used"),
    (["slurm.template=nowhere"], "slurm.template='nowhere' has no slurm/nowhere.sbatch.j2"),
    (['run.dir="/tmp/it\'s"'], "run.dir=.*quote"),
    (["slurm.nodes=0"], "slurm.nodes=0 must be >= 1"),
])
def test_bad_settings_name_the_setting(overrides, match):
    with pytest.raises(SubmitError, match=match):
        _job(["slurm.tasks_per_node=4", "parallel.dp=4", *overrides])


FRONTIER = ["cluster=frontier", "slurm.nodes=2", "model=tiny", "parallel.dp=16"]


@pytest.mark.parametrize("overrides, match", [
    ([*FRONTIER, "slurm.net_plugin=/p"], "slurm.rocm=None: set the version of Frontier's rocm module"),
    ([*FRONTIER, "slurm.rocm=6.2.4"], "slurm.net_plugin is unset.*aws-ofi-rccl"),
    (["cluster=alps", "parallel.dp=4", "slurm.uenv=a:b", "slurm.container=c"], "slurm.uenv and slurm.container"),
    (["cluster=perlmutter", "parallel.dp=4", "slurm.uenv=a:b"], "for the alps template, not perlmutter"),
    (["cluster=perlmutter", "parallel.dp=4", "launch.backend=gloo"], "cluster=perlmutter describes GPUs"),
    (["slurm.template=perlmutter", "slurm.tasks_per_node=4", "parallel.dp=4"], "set cluster=perlmutter"),
])
def test_centre_settings_name_the_fix(overrides, match):
    with pytest.raises(ValueError, match=match):
        _job(overrides)


def test_frontier_rocm_module_must_match_torch(monkeypatch):
    monkeypatch.setattr("axon.slurm_site.torch_hip", lambda: "6.1.40091-a8dbc0c19")
    with pytest.raises(ValueError, match="slurm.rocm=6.2.4 but torch here is built for ROCm 6.1"):
        _job([*FRONTIER, "slurm.rocm=6.2.4", "slurm.net_plugin=/p"])
    assert _job([*FRONTIER, "slurm.rocm=6.1.3", "slurm.net_plugin=/p"]).site.rocm == "6.1.3"


def test_gpu_presets_run_nccl_and_cpu_jobs_keep_auto():
    assert "launch.backend=nccl" in _job(CASES["perlmutter"]).overrides
    assert not any(o.startswith("launch.backend") for o in _job(CASES["local-cpu"]).overrides)
    assert _job([*CASES["perlmutter"], "launch.backend=nccl"]).overrides.count("launch.backend=nccl") == 1


def test_alps_without_uenv_or_container_does_not_force_the_plugin():
    script = render(_job([o for o in CASES["alps"] if not o.startswith("slurm.uenv")]))
    assert "export NCCL_NET=" not in script
    assert "TCP sockets" in script


def test_layout_is_checked_against_the_job_size():
    with pytest.raises(PlanError, match="parallel.dp"):
        _job(["slurm.tasks_per_node=4", "parallel.dp=3"])


@pytest.mark.parametrize("value, seconds", [("30", 1800), ("5:30", 330), ("01:30:00", 5400), ("2-0", 172800),
                                            ("1-12:30", 131400), ("1-00:00:10", 86410)])
def test_time_limit(value, seconds):
    assert time_limit_s(value) == seconds


def test_dry_prints_and_submit_records(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["slurm.tasks_per_node=4", "model=tiny", "parallel.dp=4", "run.name=r"]
    assert submit.main(["--dry", *args]) == 0
    shown = capsys.readouterr()
    assert shown.out.startswith("#!/bin/bash\n") and "plan:   dp=4" in shown.err
    dry = json.loads((tmp_path / "runs" / "r" / "submit.json").read_text())
    assert dry["job_id"] is None and dry["plan"]["dp"] == 4  # --dry records the pick, queues nothing

    _fake_bin(tmp_path, "sbatch", f'echo "$@" > "{tmp_path}/sbatch-args"; echo "4242;axontest"')
    monkeypatch.setenv("PATH", f"{tmp_path}/bin:{os.environ['PATH']}")
    assert submit.main(args) == 0
    assert capsys.readouterr().out == "4242\n"
    run_dir = tmp_path / "runs" / "r"
    assert (tmp_path / "sbatch-args").read_text().split() == ["--parsable", str(run_dir / "submit.sbatch")]
    record = json.loads((run_dir / "submit.json").read_text())
    assert record["job_id"] == "4242" and record["plan"]["dp"] == 4 and record["python"] == sys.executable
    assert record["log"] == str(run_dir / "slurm-4242.out")


def test_missing_sbatch_is_explained(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert submit.main(["slurm.tasks_per_node=4", "parallel.dp=4"]) == 2
    assert "sbatch is not on PATH" in capsys.readouterr().err


if __name__ == "__main__" and sys.argv[1:] == ["--update"]:
    GOLDEN.mkdir(exist_ok=True)
    for name, case in CASES.items():
        (GOLDEN / f"{name}.sbatch").write_text(render(_job(case)))
        print(f"wrote {GOLDEN / name}.sbatch")
