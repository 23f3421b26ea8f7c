"""The launcher end to end on real processes (gloo): local workers started by `run_local`, a rank
killed mid-job, `mpiexec` with the mpi4py rendezvous, a fabricated Slurm step, the process-group
timeout on a hung collective, and the backend choice."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from launch import dist as launch_dist
from launch.env import detect
from launch.local import spawn
from launch.spawn import run_local

WORKER = "tests.integration.launch_worker"
REPO = Path(__file__).resolve().parents[2]
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
                 "MASTER_PORT", "TORCHELASTIC_USE_AGENT_STORE", "OMP_NUM_THREADS")

PARENT_DEATH_S = 10.0  # a worker must be gone this soon after its supervisor is SIGKILLed

pytestmark = pytest.mark.timeout(120)


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without launcher variables (Slurm/MPI ones too), plus `extra`."""
    env = {k: v for k, v in os.environ.items()
           if k not in LAUNCHER_VARS and not k.startswith(("SLURM_", "PMI", "OMPI_", "MPI_", "MV2_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return {**env, **extra}


@pytest.fixture
def local_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """run_local reads os.environ: give it a clean one that can import the test worker."""
    for name in list(os.environ):
        if name not in clean_env():
            monkeypatch.delenv(name)
    monkeypatch.setenv("PYTHONPATH", clean_env()["PYTHONPATH"])


def results(out: Path, world: int) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


def test_run_local_workers_all_reduce(tmp_path: Path, local_env: None, capfd: pytest.CaptureFixture) -> None:
    assert run_local(4, [str(tmp_path), "sum"], module=WORKER) == 0
    cores = len(os.sched_getaffinity(0))
    for r, info in enumerate(results(tmp_path, 4)):
        assert (info["kind"], info["rank"], info["world_size"], info["local_rank"]) == ("torchrun", r, 4, r)
        assert (info["dist_rank"], info["dist_world"], info["backend"]) == (r, 4, "gloo")
        assert info["sum"] == 1 + 2 + 3 + 4
        assert info["threads"] == max(1, cores // 4)
    out, err = capfd.readouterr()
    assert "hello from rank 0" in out  # rank 0 passes through
    assert "[rank 3] hello from rank 3" in err and "hello from rank 3" not in out  # others prefixed


def test_killed_rank_stops_the_job(tmp_path: Path, local_env: None) -> None:
    code = run_local(4, [str(tmp_path), "die"], module=WORKER, timeout_s=5.0)
    assert code != 0
    pids = [int((tmp_path / f"pid{r}").read_text()) for r in range(4)]
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # every worker is gone (and reaped)


def test_failed_worker_stops_the_others_and_its_code_passes_through(tmp_path: Path, local_env: None) -> None:
    # Rank 1 exits 3 while rank 0 sleeps ignoring SIGTERM: only SIGKILL after the grace ends the job.
    assert run_local(2, [str(tmp_path), "fail-one"], module=WORKER, timeout_s=1.0) == 3
    with pytest.raises(ProcessLookupError):
        os.kill(int((tmp_path / "pid0").read_text()), 0)


def _alive(pid: int) -> bool:
    """True while `pid` runs (a zombie waiting for a reaper counts as gone)."""
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


def _start_supervisor(tmp_path: Path) -> tuple[subprocess.Popen, list[int]]:
    """A `run_local(2, sleep)` supervisor in its own process, once both workers are up."""
    code = f"import sys; from launch.spawn import run_local; sys.exit(run_local(2, [{str(tmp_path)!r}, 'sleep'], " \
           f"module={WORKER!r}, timeout_s=5.0))"
    sup = subprocess.Popen([sys.executable, "-c", code], env=clean_env())
    pid_files = [tmp_path / f"pid{r}" for r in range(2)]
    while not all(f.exists() and f.read_text() for f in pid_files):
        assert sup.poll() is None, "the supervisor exited before its workers started"
        time.sleep(0.1)
    return sup, [int(f.read_text()) for f in pid_files]


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc to see the workers")
def test_ctrl_c_stops_all_workers(tmp_path: Path) -> None:
    sup, pids = _start_supervisor(tmp_path)
    sup.send_signal(signal.SIGINT)
    assert sup.wait(timeout=60) == 130
    assert not any(_alive(pid) for pid in pids)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux only")
def test_workers_die_with_a_killed_supervisor(tmp_path: Path) -> None:
    sup, pids = _start_supervisor(tmp_path)
    assert all(_alive(pid) for pid in pids)
    sup.kill()  # SIGKILL: no handler runs, only the parent-death signal can stop the workers
    assert sup.wait() == -signal.SIGKILL
    deadline = time.monotonic() + PARENT_DEATH_S
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    survivors = [pid for pid in pids if _alive(pid)]
    for pid in survivors:  # do not leak them into the rest of the run
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert not survivors, f"workers {survivors} outlived their SIGKILLed supervisor by {PARENT_DEATH_S} s"


def test_local_spawn_returns_every_rank_result() -> None:
    from tests.integration import launch_worker

    assert spawn(3, launch_worker.rank_sum, timeout_s=60) == [(r, 6.0, 1) for r in range(3)]


@pytest.mark.parametrize("how,cause", [("raise", "ValueError: rank 1 fails on purpose"),
                                       ("exit", "exited with code 7 without a Python exception")])
def test_local_spawn_fails_loudly_when_a_rank_fails(how: str, cause: str) -> None:
    """The failing rank is named first (not its peer, whose barrier broke), with its own error."""
    from tests.integration import launch_worker

    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=f"^rank 1 failed in fail_on_rank:\n(.*\n)*{cause}"):
        spawn(2, launch_worker.fail_on_rank, 1, how, timeout_s=300)
    assert time.monotonic() - t0 < 90  # the survivor was stopped, not left to its 300 s collective timeout


def _mpiexec() -> str:
    found = shutil.which("mpiexec", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    if found is None:
        pytest.skip("mpiexec not found (pip install mpich mpi4py)")
    probe = subprocess.run([found, "-n", "1", sys.executable, "-c", "from mpi4py import MPI"],
                           env=clean_env(), capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        pytest.skip(f"mpiexec cannot run here: {probe.stderr.strip()[-400:]}")
    return found


def test_mpiexec_with_mpi4py_rendezvous(tmp_path: Path) -> None:
    mpiexec = _mpiexec()
    proc = subprocess.run([mpiexec, "-n", "2", sys.executable, "-m", WORKER, str(tmp_path), "sum"],
                          env=clean_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=100)
    assert proc.returncode == 0, proc.stderr
    for r, info in enumerate(results(tmp_path, 2)):
        assert (info["kind"], info["rank"], info["world_size"], info["sum"]) == ("mpi", r, 2, 3.0)


def test_fabricated_slurm_step(tmp_path: Path) -> None:
    port = launch_dist.free_port("127.0.0.1")
    procs = []
    for r in range(2):
        env = clean_env(OMP_NUM_THREADS="1", SLURM_JOB_ID="777", SLURM_STEP_ID="0", SLURM_PROCID=str(r),
                        SLURM_LOCALID=str(r), SLURM_NODEID="0", SLURM_NTASKS="2",
                        SLURM_STEP_TASKS_PER_NODE="2", SLURM_STEP_NODELIST="localhost", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, "-m", WORKER, str(tmp_path), "sum"], env=env))
    assert [p.wait(timeout=100) for p in procs] == [0, 0]
    for r, info in enumerate(results(tmp_path, 2)):
        assert (info["kind"], info["rank"], info["local_rank"], info["sum"]) == ("slurm", r, r, 3.0)


def test_timeout_fails_a_hung_collective(tmp_path: Path) -> None:
    """Rank 1 stays alive but never joins: rank 0's all-reduce must fail after launch.timeout_s."""
    port = launch_dist.free_port("127.0.0.1")
    procs = [subprocess.Popen([sys.executable, "-m", WORKER, str(tmp_path), "hang", "3"],
                              env=clean_env(OMP_NUM_THREADS="1", RANK=str(r), WORLD_SIZE="2",
                                            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)),
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    try:
        _, err = procs[0].communicate(timeout=100)
        assert procs[0].returncode != 0, err
        assert procs[1].poll() is None  # rank 0 failed on the timeout, not because its peer left
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_single_process_initializes_the_same_way() -> None:
    env = detect({})
    try:
        assert launch_dist.init(env, "auto", 30.0) == ("nccl" if torch.cuda.is_available() else "gloo")
        x = torch.ones(3)  # [3]
        torch.distributed.all_reduce(x)
        assert torch.distributed.get_world_size() == 1 and x.tolist() == [1.0, 1.0, 1.0]
    finally:
        launch_dist.shutdown()
    assert not torch.distributed.is_initialized()
    launch_dist.shutdown()  # a second call is harmless


def test_backend_choice() -> None:
    assert launch_dist.resolve_backend("gloo") == "gloo"
    with pytest.raises(ValueError, match="launch.backend='mpi'"):
        launch_dist.resolve_backend("mpi")
    if torch.cuda.is_available():
        assert launch_dist.resolve_backend("auto") == "nccl"
    else:
        assert launch_dist.resolve_backend("auto") == "gloo"
        with pytest.raises(RuntimeError, match="launch.backend=nccl"):
            launch_dist.resolve_backend("nccl")
