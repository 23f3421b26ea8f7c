"""The backend decision before any process starts (launch/dist.py, axon/train.py): GPUs given but
unusable is an error naming the GPU build, cluster presets must match the backend, the timeout
default follows the backend, and every subgroup gets the timeout."""
from __future__ import annotations

from datetime import timedelta

import pytest

from axon import train
from axon.config import freeze, load
from launch import dist as launch_dist
from launch.dist import BackendError, check_cluster, resolve_backend, timeout_for
from launch.env import detect, gpus_given
from launch.grid import Grid
from perfmodel.specs import Plan


@pytest.mark.parametrize("environ, given", [
    ({}, None),
    ({"SLURM_GPUS_ON_NODE": "4"}, "SLURM_GPUS_ON_NODE=4"),
    ({"SLURM_GPUS_PER_NODE": "a100:4"}, "SLURM_GPUS_PER_NODE=a100:4"),
    ({"SLURM_GPUS_PER_TASK": "0"}, None),
    ({"CUDA_VISIBLE_DEVICES": "0"}, "CUDA_VISIBLE_DEVICES=0"),  # device 0, not a count
    ({"CUDA_VISIBLE_DEVICES": ""}, None),
    ({"CUDA_VISIBLE_DEVICES": "-1"}, None),
    ({"SLURM_JOB_GPUS": "NoDevFiles"}, None),
    ({"ROCR_VISIBLE_DEVICES": "0,1"}, "ROCR_VISIBLE_DEVICES=0,1"),
])
def test_gpus_given(environ: dict, given: str | None) -> None:
    assert gpus_given(environ) == given
    assert detect(environ).gpus_given == given


def test_auto_picks_nccl_with_a_gpu_and_gloo_without() -> None:
    assert resolve_backend("auto", None, cuda_available=True) == "nccl"
    assert resolve_backend("auto", "SLURM_GPUS_ON_NODE=4", cuda_available=True) == "nccl"
    assert resolve_backend("auto", None, cuda_available=False) == "gloo"
    assert resolve_backend("gloo", "SLURM_GPUS_ON_NODE=4", cuda_available=False) == "gloo"  # on purpose


def test_gpus_given_but_none_visible_is_an_error_naming_the_install() -> None:
    with pytest.raises(BackendError, match=r"given GPUs \(SLURM_GPUS_ON_NODE=4\).*AXON_TORCH=cuda"):
        resolve_backend("auto", "SLURM_GPUS_ON_NODE=4", cuda_available=False)
    with pytest.raises(BackendError, match="AXON_TORCH=cuda"):
        resolve_backend("nccl", "CUDA_VISIBLE_DEVICES=0", cuda_available=False)
    with pytest.raises(RuntimeError, match="launch.backend='mpi'"):
        resolve_backend("mpi")


@pytest.mark.parametrize("backend, cluster, fix", [
    ("nccl", "local-cpu", "cluster=perlmutter"),
    ("gloo", "perlmutter", "launch.backend=auto"),
    ("gloo", "frontier", "cluster=local-cpu"),
])
def test_cluster_and_backend_must_agree(backend: str, cluster: str, fix: str) -> None:
    with pytest.raises(BackendError, match=fix):
        check_cluster(backend, cluster)


def test_matching_cluster_and_backend_pass() -> None:
    check_cluster("gloo", "local-cpu")
    check_cluster("nccl", "alps")


def test_timeout_default_follows_the_backend() -> None:
    assert timeout_for("gloo", None) == 120.0
    assert timeout_for("nccl", None) == 600.0
    assert timeout_for("nccl", 30) == 30.0
    with pytest.raises(BackendError, match="launch.timeout_s=0"):
        timeout_for("gloo", 0)


def test_train_refuses_a_gpu_cluster_on_cpu_before_starting(capsys, tmp_path) -> None:
    argv = ["cluster=perlmutter", "launch.backend=gloo", "model=tiny", "train.steps=1", f"run.dir={tmp_path}"]
    assert train.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "cluster=perlmutter describes GPUs" in err


def test_resolve_launch_fills_backend_and_timeout() -> None:
    cfg = train.resolve_launch(freeze(load(["model=tiny"])), detect({}))
    if launch_dist.torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the default cluster=local-cpu is refused there")
    assert (cfg.launch.backend, cfg.launch.timeout_s) == ("gloo", 120.0)


def test_every_subgroup_gets_the_timeout(monkeypatch) -> None:
    seen = []
    monkeypatch.setattr("torch.distributed.new_group", lambda ranks, timeout=None: seen.append(timeout))
    Grid.build(Plan(dp=2, pp=2), 0, 4, timeout_s=42.0)
    assert seen and all(t == timedelta(seconds=42.0) for t in seen)
