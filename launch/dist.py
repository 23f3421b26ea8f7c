"""Initialize and tear down torch.distributed from a detected `LaunchEnv`.

`init` always creates the default process group, also for a single process, so one rank runs
the same code as many. The rendezvous is a TCP store at master_addr:master_port (under torchrun
torch connects to the agent's store by itself). Under MPI with no MASTER_ADDR, rank 0 picks its
hostname and a free port and broadcasts them with mpi4py. `timeout_s` (unset: DEFAULT_TIMEOUT_S of
the backend) becomes the process-group timeout: a collective whose peer died or stopped fails after
at most that long instead of hanging; launch/grid.py gives every subgroup the same timeout. The
rendezvous (TCP store) has the same timeout. On nccl, torch's own NCCL watchdog is set to the same
timeout (`nccl_env`: abort and exit on a timed-out collective, dump its flight recorder next to the
rank status files); a variable the user set is never overridden. Stalls no collective notices are
ended by launch/watchdog.py.
"""
from __future__ import annotations

import math
import os
import socket
from datetime import timedelta
from pathlib import Path
from typing import Mapping, Optional

import torch
import torch.distributed as dist

from launch.env import LaunchEnv
from launch.watchdog import MARGIN_S

BACKENDS = ("auto", "gloo", "nccl")  # nccl is RCCL on a ROCm build of torch
# launch.timeout_s when unset: a CPU run shows a dead peer quickly; on GPUs NCCL's start-up, the
# first step's compilation and checkpoint barriers of a large model take minutes
DEFAULT_TIMEOUT_S = {"gloo": 120.0, "nccl": 600.0}
CPU_CLUSTERS = ("local-cpu",)  # cluster presets that describe CPUs (axon tune --calibrate writes local-cpu)
# torch reads each NCCL watchdog setting under several names (the first wins); a user's value under any is kept
NCCL_ALIASES = {
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": ("TORCH_NCCL_ASYNC_ERROR_HANDLING", "NCCL_ASYNC_ERROR_HANDLING"),
    "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": ("TORCH_NCCL_DEBUG_INFO_TEMP_FILE", "TORCH_FR_DUMP_TEMP_FILE"),
}
INSTALL_GPU_BUILD = ("install the GPU build of torch with `AXON_TORCH=cuda bash scripts/setup.sh` "
                     "(AMD: `AXON_TORCH=rocm AXON_ROCM=<the rocm module's X.Y> bash scripts/setup.sh`)")


class BackendError(ValueError, RuntimeError):
    """The backend cannot run here, or contradicts the cluster preset; the message names the fix."""


def resolve_backend(backend: str, gpus_given: Optional[str] = None, cuda_available: Optional[bool] = None) -> str:
    """`auto` -> nccl when a GPU is usable, else gloo; but a process given GPUs (`gpus_given`, from
    `LaunchEnv`) that sees none is an error, not a silent CPU run. nccl without a GPU is an error."""
    if backend not in BACKENDS:
        raise BackendError(f"launch.backend={backend!r} is not one of {BACKENDS}")
    cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    if cuda:
        return "nccl" if backend == "auto" else backend
    build = _torch_build()
    if backend == "nccl":
        raise BackendError(f"launch.backend=nccl needs a GPU but torch {build} sees none; "
                           + ("use launch.backend=gloo (or auto)" if gpus_given is None else INSTALL_GPU_BUILD))
    if backend == "auto" and gpus_given is not None:
        fix = (INSTALL_GPU_BUILD if "CPU-only" in build else
               "check the driver (nvidia-smi / rocm-smi on the node) and the device variables")
        raise BackendError(f"launch.backend=auto: this process was given GPUs ({gpus_given}) but torch {build} "
                           f"sees none; {fix}, or set launch.backend=gloo cluster=local-cpu to run on CPU on purpose")
    return "gloo"


def check_cluster(backend: str, cluster: str) -> None:
    """The cluster preset (peak FLOP/s, memory: MFU and parallel=auto) must describe the devices
    the resolved backend runs on."""
    if backend == "nccl" and cluster in CPU_CLUSTERS:
        raise BackendError(f"cluster={cluster} describes CPUs but this job runs on GPUs (launch.backend=nccl): "
                           "set the GPU cluster's preset, e.g. cluster=perlmutter|frontier|alps|dgx-h100 "
                           "(configs/cluster/)")
    if backend == "gloo" and cluster not in CPU_CLUSTERS:
        raise BackendError(f"cluster={cluster} describes GPUs but this job runs on CPU (launch.backend=gloo): "
                           "run on the GPU nodes with launch.backend=auto (or nccl), or use cluster=local-cpu "
                           "for a CPU run")


def timeout_for(backend: str, timeout_s: Optional[float]) -> float:
    """`launch.timeout_s`, or the backend's default when unset; it must be positive."""
    value = DEFAULT_TIMEOUT_S[backend] if timeout_s is None else float(timeout_s)
    if value <= 0:
        raise BackendError(f"launch.timeout_s={timeout_s} must be > 0 (seconds)")
    return value


def collective_timeout(timeout_s: float) -> float:
    """The process-group timeout for a job whose ranks run launch/watchdog.py with `timeout_s`:
    MARGIN_S past the watchdog's limit, so a stall ends with the watchdog's report of every rank
    and a collective's own timeout error stays the backstop."""
    return timeout_s + 2 * MARGIN_S


def _torch_build() -> str:
    hip, cuda = getattr(torch.version, "hip", None), torch.version.cuda
    kind = f"ROCm {hip}" if hip else f"CUDA {cuda}" if cuda else "CPU-only"
    return f"{torch.__version__} ({kind} build)"


def nccl_env(environ: Mapping[str, str], timeout_s: float, trace_dir: Optional[Path] = None) -> dict[str, str]:
    """The variables of torch's NCCL watchdog (torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp) to
    add to `environ` so a stuck NCCL collective ends the process within `timeout_s` (the group's
    timeout) + MARGIN_S; only those not already set (under any of torch's names)."""
    wanted = {
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",  # a timed-out collective aborts the communicators, ends the process
        "TORCH_NCCL_ENABLE_MONITORING": "1",  # ... also when NCCL's own watchdog thread is stuck
        "TORCH_NCCL_HEARTBEAT_TIMEOUT_SEC": str(math.ceil(timeout_s + MARGIN_S)),
        # the flight recorder (on by default: TORCH_FR_BUFFER_SIZE, 2000 entries), written out
        # when a collective times out
        "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
    }
    if trace_dir is not None:
        wanted["TORCH_NCCL_DEBUG_INFO_TEMP_FILE"] = str(Path(trace_dir) / "nccl_trace_rank_")
    return {k: v for k, v in wanted.items() if not any(name in environ for name in NCCL_ALIASES.get(k, (k,)))}


def init(env: LaunchEnv, backend: str, timeout_s: Optional[float], trace_dir: Optional[Path] = None) -> str:
    """Create the default process group for `env`; returns the backend used (gloo | nccl). On
    nccl the group is bound to this rank's GPU (`device_id`), so NCCL's communicator is created
    here rather than at the first collective, and barriers know their device; torch's NCCL
    watchdog gets the same timeout (`nccl_env`; its flight-recorder dumps go to `trace_dir`)."""
    chosen = resolve_backend(backend, env.gpus_given)
    seconds = timeout_for(chosen, timeout_s)
    timeout = timedelta(seconds=seconds)
    if chosen == "nccl":  # read by ProcessGroupNCCL when it is constructed below
        os.environ.update(nccl_env(os.environ, seconds, trace_dir))
    device_id = _select_device(env) if chosen == "nccl" else None
    addr, port = env.master_addr, env.master_port
    if addr is None:
        addr, port = _mpi_rendezvous(env)
    elif port == 0:
        if env.world_size > 1:
            raise RuntimeError(f"{env.kind} launch of {env.world_size} processes without a master port: "
                               "set MASTER_PORT (launch.master_port for local workers)")
        port = free_port()
    extra = {} if device_id is None else {"device_id": device_id}
    dist.init_process_group(chosen, init_method=f"tcp://{_url_host(addr)}:{port}", rank=env.rank,
                            world_size=env.world_size, timeout=timeout, **extra)
    return chosen


def _select_device(env: LaunchEnv) -> torch.device:
    """This rank's GPU: device 0 when one is visible per task, else the local rank's."""
    count = torch.cuda.device_count()
    if count == 1:  # one GPU visible per task (e.g. srun --gpus-per-task=1 --gpu-bind=closest)
        index = 0
    elif env.local_rank >= count:
        raise BackendError(f"local rank {env.local_rank} has no GPU: this node shows {count}; start at most "
                           f"{count} processes per node (launch.nproc_per_node, srun --ntasks-per-node, mpiexec -ppn)")
    else:
        index = env.local_rank
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def shutdown() -> None:
    """Destroy the default process group; a group broken by a dead peer must not stop the exit."""
    if not dist.is_initialized():
        return
    try:
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - a dead peer can make any backend raise here; we are leaving anyway
        pass


def free_port(host: str = "") -> int:
    """A TCP port that is free now (the OS picks it; it may be taken again before use)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _mpi_rendezvous(env: LaunchEnv) -> tuple[str, int]:
    """Rank 0's hostname and a free port of its machine, broadcast to every rank over MPI."""
    try:
        from mpi4py import MPI
    except ImportError:
        raise RuntimeError("launched by MPI without MASTER_ADDR/MASTER_PORT: install mpi4py "
                           "(pip install mpi4py) or export MASTER_ADDR and MASTER_PORT") from None
    comm = MPI.COMM_WORLD
    if comm.Get_size() != env.world_size or comm.Get_rank() != env.rank:
        raise RuntimeError(f"mpi4py sees rank {comm.Get_rank()} of {comm.Get_size()} but the environment "
                           f"says rank {env.rank} of {env.world_size}: mpi4py is built against another MPI "
                           "than the one running this job")
    mine = (socket.gethostname(), free_port()) if env.rank == 0 else None
    addr, port = comm.bcast(mine, root=0)
    return addr, port


def _url_host(addr: str) -> str:
    return f"[{addr}]" if ":" in addr and not addr.startswith("[") else addr
