"""Launcher detection from fabricated environments: torchrun, Slurm, MPI flavours, precedence,
Slurm node-list and tasks-per-node parsing, and clear errors on inconsistent variables."""
from __future__ import annotations

import pytest

from launch.env import LaunchEnv, LaunchEnvError, detect, hostnames, tasks_per_node

TORCHRUN = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "1",
            "MASTER_ADDR": "node0", "MASTER_PORT": "29500"}
SLURM = {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_PROCID": "6", "SLURM_NTASKS": "8",
         "SLURM_LOCALID": "2", "SLURM_NODEID": "1", "SLURM_TASKS_PER_NODE": "4(x2)",
         "SLURM_JOB_NODELIST": "nid[001-002]"}
MPICH = {"PMI_RANK": "3", "PMI_SIZE": "4", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2", "PMI_FD": "9"}


def test_torchrun() -> None:
    assert detect(TORCHRUN) == LaunchEnv("torchrun", 5, 8, 1, 4, 1, "node0", 29500)


def test_torchrun_minimal_defaults_local_to_one_node() -> None:
    env = detect({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1234"})
    assert (env.local_rank, env.local_world_size, env.node_rank) == (0, 2, 0)


def test_single_process() -> None:
    assert detect({"HOME": "/root"}) == LaunchEnv("single", 0, 1, 0, 1, 0, "127.0.0.1", 0)


def test_slurm_step_task() -> None:
    assert detect(SLURM) == LaunchEnv("slurm", 6, 8, 2, 4, 1, "nid001", detect(SLURM).master_port)


def test_slurm_port_is_shared_by_the_step_and_differs_between_jobs_and_steps() -> None:
    port = detect(SLURM).master_port
    assert 1024 < port < 65536
    assert detect({**SLURM, "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}).master_port == port
    assert detect({**SLURM, "SLURM_JOB_ID": "4243"}).master_port != port
    assert detect({**SLURM, "SLURM_STEP_ID": "1"}).master_port != port


def test_slurm_step_variables_win_over_job_ones() -> None:
    env = detect({**SLURM, "SLURM_STEP_NUM_TASKS": "3", "SLURM_STEP_TASKS_PER_NODE": "2,1",
                  "SLURM_STEP_NODELIST": "gpu[17,19]", "SLURM_PROCID": "2", "SLURM_LOCALID": "0"})
    assert (env.world_size, env.local_world_size, env.master_addr) == (3, 1, "gpu17")


def test_slurm_master_overrides_and_ntasks_per_node() -> None:
    environ = {k: v for k, v in SLURM.items() if k != "SLURM_TASKS_PER_NODE"}
    env = detect({**environ, "SLURM_NTASKS_PER_NODE": "4", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "3333"})
    assert (env.local_world_size, env.master_addr, env.master_port) == (4, "10.0.0.1", 3333)


def test_slurm_batch_shell_is_not_a_step_task() -> None:
    # An sbatch script has SLURM_PROCID=0 and SLURM_NTASKS but runs as one process.
    batch = {k: v for k, v in SLURM.items() if k != "SLURM_STEP_ID"}
    assert detect({**batch, "SLURM_PROCID": "0"}).kind == "single"


def test_node_lists() -> None:
    assert hostnames("nid[001-003,010],login5") == ["nid001", "nid002", "nid003", "nid010", "login5"]
    assert hostnames("node7") == ["node7"]
    assert hostnames("a[1-2]b[08-09],c") == ["a1b08", "a1b09", "a2b08", "a2b09", "c"]
    assert hostnames("x[98-101]") == ["x98", "x99", "x100", "x101"]
    for bad in ("nid[001-003", "nid[a-b]", ""):
        with pytest.raises(LaunchEnvError, match="node list"):
            hostnames(bad)


def test_tasks_per_node() -> None:
    assert tasks_per_node("4(x2)") == [4, 4]
    assert tasks_per_node("4(x2),3,2(x3)") == [4, 4, 3, 2, 2, 2]
    with pytest.raises(LaunchEnvError, match="tasks-per-node"):
        tasks_per_node("4x2")


def test_mpich_hydra() -> None:
    assert detect(MPICH) == LaunchEnv("mpi", 3, 4, 1, 2, 1, None, 0)


def test_openmpi() -> None:
    env = detect({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "16", "OMPI_COMM_WORLD_LOCAL_RANK": "2",
                  "OMPI_COMM_WORLD_LOCAL_SIZE": "8", "PMIX_RANK": "2"})
    assert env == LaunchEnv("mpi", 2, 16, 2, 8, 0, None, 0)


def test_mvapich_and_pmix() -> None:
    mv2 = detect({"MV2_COMM_WORLD_RANK": "9", "MV2_COMM_WORLD_SIZE": "12", "MV2_COMM_WORLD_LOCAL_RANK": "1",
                  "MV2_COMM_WORLD_LOCAL_SIZE": "4"})
    assert (mv2.rank, mv2.world_size, mv2.local_rank, mv2.node_rank) == (9, 12, 1, 2)
    with pytest.raises(LaunchEnvError, match="PMIX_RANK"):
        detect({"PMIX_RANK": "0"})  # no world size anywhere


def test_mpi_with_explicit_master() -> None:
    env = detect({**MPICH, "MASTER_ADDR": "head", "MASTER_PORT": "4000"})
    assert (env.master_addr, env.master_port) == ("head", 4000)


def test_precedence_torchrun_over_slurm_over_mpi() -> None:
    assert detect({**MPICH, **SLURM, **TORCHRUN}).kind == "torchrun"
    both = {**SLURM, "PMI_RANK": "6", "PMI_SIZE": "8"}  # srun --mpi=pmi2: consistent with Slurm
    assert detect(both).kind == "slurm"
    assert detect(MPICH).kind == "mpi"


def test_mpiexec_through_srun_proxies_is_mpi() -> None:
    # mpiexec under Slurm starts one proxy per node with srun: the Slurm step has 2 tasks,
    # the MPI job has 8 ranks; the MPI view is the real one.
    environ = {**SLURM, "SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "0",
               "SLURM_TASKS_PER_NODE": "1(x2)", "PMI_RANK": "5", "PMI_SIZE": "8",
               "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "4"}
    env = detect(environ)
    assert (env.kind, env.rank, env.world_size) == ("mpi", 5, 8)


@pytest.mark.parametrize("environ, match", [
    ({**TORCHRUN, "RANK": "8"}, "rank 8 is outside world size 8"),
    ({**TORCHRUN, "LOCAL_RANK": "4"}, "local rank 4 is outside local world size 4"),
    ({**TORCHRUN, "WORLD_SIZE": "eight"}, "WORLD_SIZE='eight' is not an integer"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h"}, "without MASTER_PORT"),
    ({"RANK": "0"}, "without WORLD_SIZE"),
    ({**TORCHRUN, "MASTER_PORT": "70000"}, "not a TCP port"),
    ({**SLURM, "SLURM_PROCID": "8"}, "rank 8 is outside world size 8"),
    ({**SLURM, "SLURM_NODEID": "2"}, "SLURM_NODEID=2"),
    ({k: v for k, v in SLURM.items() if k != "SLURM_NTASKS"}, "SLURM_NTASKS"),
    ({k: v for k, v in SLURM.items() if k != "SLURM_JOB_NODELIST"}, "MASTER_ADDR"),
    ({**MPICH, "PMI_SIZE": "0"}, "world size 0"),
    ({**MPICH, "PMI_RANK": "-1"}, "rank -1 is outside"),
])
def test_inconsistent_environment_is_a_clear_error(environ: dict, match: str) -> None:
    with pytest.raises(LaunchEnvError, match=match):
        detect(environ)


def test_a_rank_stopped_after_its_own_exception_is_named_first(tmp_path):
    """launch/local.py: the rank that raised is the root cause even when it was still tearing down
    (stopped by the supervisor) after its peer, whose barrier broke, had already exited non-zero."""
    from types import SimpleNamespace

    from launch.local import _failed, _failure_report

    procs = [SimpleNamespace(exitcode=1), SimpleNamespace(exitcode=-15)]  # rank 1 stopped by SIGTERM
    (tmp_path / "1.err").write_text("100.0\nTraceback ...\nValueError: rank 1 fails on purpose\n")
    (tmp_path / "0.err").write_text("101.0\nTraceback ...\nRuntimeError: Connection closed by peer\n")
    failed = _failed(procs, {1}, str(tmp_path))
    assert failed == [0, 1]
    report = _failure_report(SimpleNamespace(__name__="fn"), procs, failed, {1}, str(tmp_path))
    assert report.startswith("rank 1 failed in fn:\nTraceback ...\nValueError: rank 1 fails on purpose")
    assert "then rank 0: RuntimeError: Connection closed by peer" in report and "were stopped" not in report
    (tmp_path / "1.err").unlink()  # a rank stopped with no error of its own is not a failure
    assert _failed(procs, {1}, str(tmp_path)) == [0]
