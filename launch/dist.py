"""Initialize and tear down torch.distributed from a detected `LaunchEnv`.

`init` always creates the default process group, also for a single process, so one rank runs
the same code as many. The rendezvous is a TCP store at master_addr:master_port (under torchrun
torch connects to the agent's store by itself). Under MPI with no MASTER_ADDR, rank 0 picks its
hostname and a free port and broadcasts them with mpi4py. `timeout_s` becomes the process-group
timeout: a collective whose peer died or stopped fails after at most that long instead of hanging.
"""
from __future__ import annotations

import socket
from datetime import timedelta

import torch
import torch.distributed as dist

from launch.env import LaunchEnv

BACKENDS = ("auto", "gloo", "nccl")


def resolve_backend(backend: str) -> str:
    """`auto` -> nccl when CUDA is available, else gloo; nccl without CUDA is an error."""
    if backend not in BACKENDS:
        raise ValueError(f"launch.backend={backend!r} is not one of {BACKENDS}")
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise RuntimeError("launch.backend=nccl needs a CUDA GPU but none is visible; "
                           "use launch.backend=gloo (or auto)")
    return backend


def init(env: LaunchEnv, backend: str, timeout_s: float) -> str:
    """Create the default process group for `env`; returns the backend used (gloo | nccl)."""
    if timeout_s <= 0:
        raise ValueError(f"launch.timeout_s={timeout_s} must be > 0")
    chosen = resolve_backend(backend)
    if chosen == "nccl":
        count = torch.cuda.device_count()
        if count == 1:  # one GPU visible per task (e.g. srun --gpus-per-task=1 --gpu-bind=closest)
            torch.cuda.set_device(0)
        elif env.local_rank >= count:
            raise RuntimeError(f"local rank {env.local_rank} has no GPU: this node shows {count}; "
                               f"start at most {count} processes per node (launch.nproc_per_node, "
                               "srun --ntasks-per-node, mpiexec -ppn)")
        else:
            torch.cuda.set_device(env.local_rank)
    addr, port = env.master_addr, env.master_port
    if addr is None:
        addr, port = _mpi_rendezvous(env)
    elif port == 0:
        if env.world_size > 1:
            raise RuntimeError(f"{env.kind} launch of {env.world_size} processes without a master port: "
                               "set MASTER_PORT (launch.master_port for local workers)")
        port = free_port()
    dist.init_process_group(chosen, init_method=f"tcp://{_url_host(addr)}:{port}", rank=env.rank,
                            world_size=env.world_size, timeout=timedelta(seconds=timeout_s))
    return chosen


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
