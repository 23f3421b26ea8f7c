"""Who am I: detect the launcher that started this process and read its rank variables.

`detect(os.environ)` is the only place Axon reads launcher environment variables; everything
after it gets the frozen `LaunchEnv`. Supported, in order of precedence:

1. torchrun / torch elastic (and `axon train launch.nproc_per_node=N`, which sets the same
   variables): RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, GROUP_RANK, MASTER_ADDR/PORT.
2. Slurm, only for a task of a job step (under `srun`: SLURM_STEP_ID and SLURM_PROCID set).
   A bare `sbatch` script or `salloc` shell also has SLURM_PROCID=0 but is one process, not a
   step task. The master is the first host of the step's node list, the port is derived from
   the job and step ids (MASTER_ADDR / MASTER_PORT override both). If MPI rank variables are
   present with a different world size, `mpiexec` used srun only to start its per-node proxies
   and MPI wins.
3. MPI: OpenMPI (OMPI_COMM_WORLD_*), MPICH/Hydra and Intel MPI (PMI_RANK, PMI_SIZE,
   MPI_LOCALRANKID, MPI_LOCALNRANKS; Cray's PMI_LOCAL_RANK/SIZE), MVAPICH2 (MV2_COMM_WORLD_*),
   PMIx (PMIX_RANK, with the world size from OpenMPI's or PMI's variable). No master address
   is known, so `launch.dist.init` rendezvouses through mpi4py unless MASTER_ADDR is set.
4. A single process otherwise (master 127.0.0.1, port 0 = pick a free one at init).

Whatever the launcher, `gpus_given` records the Slurm / CUDA / ROCm variable that gave the process
GPUs, so launch.dist can refuse to train on CPU inside a GPU allocation.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Mapping, Optional

KINDS = ("torchrun", "slurm", "mpi", "single")


class LaunchEnvError(ValueError):
    """The launcher's environment variables are missing or contradict each other."""


@dataclass(frozen=True)
class LaunchEnv:
    kind: str  # torchrun | slurm | mpi | single
    rank: int  # global rank, 0 <= rank < world_size
    world_size: int
    local_rank: int  # rank among the processes on this node (selects the GPU)
    local_world_size: int
    node_rank: int  # index of this node among the job's nodes
    master_addr: Optional[str]  # None: not known from the environment (MPI without MASTER_ADDR)
    master_port: int  # 0: pick a free port at init (only for a single process or via mpi4py)
    # the variable by which the launcher or scheduler gave this process GPUs ("SLURM_GPUS_ON_NODE=4"),
    # None if none did: launch.dist refuses to fall back to CPU when GPUs were given but none is usable
    gpus_given: Optional[str] = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise LaunchEnvError(f"unknown launcher kind {self.kind!r}; expected one of {KINDS}")
        if self.world_size < 1:
            raise LaunchEnvError(f"{self.kind}: world size {self.world_size} must be >= 1")
        if not 0 <= self.rank < self.world_size:
            raise LaunchEnvError(f"{self.kind}: rank {self.rank} is outside world size {self.world_size}")
        if not 0 <= self.local_rank < self.local_world_size:
            raise LaunchEnvError(
                f"{self.kind}: local rank {self.local_rank} is outside local world size {self.local_world_size}")
        if self.local_world_size > self.world_size:
            raise LaunchEnvError(
                f"{self.kind}: local world size {self.local_world_size} exceeds world size {self.world_size}")
        if not 0 <= self.master_port < 65536:
            raise LaunchEnvError(f"{self.kind}: master port {self.master_port} is not a TCP port")


def detect(environ: Mapping[str, str]) -> LaunchEnv:
    """The launch environment of this process, from `environ` (pass `os.environ`)."""
    env = _detect(environ)
    given = gpus_given(environ)
    return env if given is None else replace(env, gpus_given=given)


# Set by Slurm for a job or step given GPUs (--gpus, --gpus-per-node, --gpus-per-task, gres) and by
# the CUDA / ROCm runtimes' device selection: https://slurm.schedmd.com/sbatch.html (OUTPUT ENVIRONMENT
# VARIABLES), https://rocm.docs.amd.com/en/latest/conceptual/gpu-isolation.html
_GPU_COUNTS = ("SLURM_GPUS_ON_NODE", "SLURM_GPUS", "SLURM_GPUS_PER_NODE", "SLURM_GPUS_PER_TASK")  # [type:]count
_GPU_LISTS = ("SLURM_JOB_GPUS", "SLURM_STEP_GPUS", "CUDA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES",
              "HIP_VISIBLE_DEVICES")  # device indices or UUIDs


def gpus_given(environ: Mapping[str, str]) -> Optional[str]:
    """'NAME=value' of the first variable that gives this process GPUs, or None. A count of 0, an
    empty list, '-1' or 'NoDevFiles' (Slurm's "no GPU here") gives none."""
    for name in _GPU_COUNTS + _GPU_LISTS:
        value = environ.get(name, "").strip()
        none = value.rpartition(":")[2] == "0" if name in _GPU_COUNTS else value in ("-1", "NoDevFiles")
        if value and not none:
            return f"{name}={value}"
    return None


def _detect(environ: Mapping[str, str]) -> LaunchEnv:
    if "RANK" in environ or "WORLD_SIZE" in environ:
        return _torchrun(environ)
    mpi = _mpi(environ) if _has_mpi(environ) else None
    if _is_slurm_step_task(environ):
        slurm = _slurm(environ)
        if mpi is None or mpi.world_size == slurm.world_size:
            return slurm
    if mpi is not None:
        return mpi
    return LaunchEnv("single", 0, 1, 0, 1, 0, environ.get("MASTER_ADDR", "127.0.0.1"),
                     _int(environ, "MASTER_PORT", 0))


# ---- torchrun ----
def _torchrun(environ: Mapping[str, str]) -> LaunchEnv:
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        if name not in environ:
            raise LaunchEnvError(f"torchrun-style environment without {name}: set RANK, WORLD_SIZE, "
                                 "MASTER_ADDR and MASTER_PORT together (or unset RANK/WORLD_SIZE)")
    world = _int(environ, "WORLD_SIZE")
    local_world = _int(environ, "LOCAL_WORLD_SIZE", world)
    local_rank = _int(environ, "LOCAL_RANK", 0)
    rank = _int(environ, "RANK")
    node = _int(environ, "GROUP_RANK", rank // local_world)
    return LaunchEnv("torchrun", rank, world, local_rank, local_world, node,
                     environ["MASTER_ADDR"], _int(environ, "MASTER_PORT"))


# ---- Slurm ----
def _is_slurm_step_task(environ: Mapping[str, str]) -> bool:
    return "SLURM_PROCID" in environ and ("SLURM_STEP_ID" in environ or "SLURM_STEPID" in environ)


def _slurm(environ: Mapping[str, str]) -> LaunchEnv:
    world_var = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in environ else "SLURM_NTASKS"
    world = _int(environ, world_var)
    node = _int(environ, "SLURM_NODEID", 0)
    per_node = _first(environ, "SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE")
    if per_node is not None:
        counts = tasks_per_node(per_node)
        if node >= len(counts):
            raise LaunchEnvError(f"SLURM_NODEID={node} but the tasks-per-node list {per_node!r} "
                                 f"covers {len(counts)} nodes")
        local_world = counts[node]
    elif "SLURM_NTASKS_PER_NODE" in environ:
        local_world = _int(environ, "SLURM_NTASKS_PER_NODE")
    else:
        local_world = world
    nodelist = _first(environ, "SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
    if "MASTER_ADDR" in environ:
        addr = environ["MASTER_ADDR"]
    elif nodelist is not None:
        addr = hostnames(nodelist)[0]
    else:
        raise LaunchEnvError("Slurm step without SLURM_STEP_NODELIST or SLURM_JOB_NODELIST: "
                             "set MASTER_ADDR to the first node's hostname")
    if "MASTER_PORT" in environ:
        port = _int(environ, "MASTER_PORT")
    else:  # every task of a step computes the same port; other jobs and steps get other ports
        job = _int(environ, "SLURM_JOB_ID", _int(environ, "SLURM_JOBID", 0))
        step = _int(environ, "SLURM_STEP_ID", _int(environ, "SLURM_STEPID", 0))
        port = 15000 + (job * 7 + step) % 20000
    return LaunchEnv("slurm", _int(environ, "SLURM_PROCID"), world, _int(environ, "SLURM_LOCALID", 0),
                     local_world, node, addr, port)


def tasks_per_node(spec: str) -> list[int]:
    """Expand a Slurm tasks-per-node string: '4(x2),3' -> [4, 4, 3]."""
    out: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if m is None:
            raise LaunchEnvError(f"cannot parse Slurm tasks-per-node {spec!r} (expected e.g. '4(x2),3')")
        out += [int(m.group(1))] * int(m.group(2) or 1)
    return out


def hostnames(nodelist: str) -> list[str]:
    """Expand a Slurm node list: 'nid[001-003,010],login5' -> nid001, nid002, nid003, nid010, login5.
    Zero padding is kept; several bracket groups in one name expand as a product ('a[1-2]b[3-4]')."""
    hosts: list[str] = []
    for item in _split_top_level(nodelist):
        hosts += _expand(item, nodelist)
    if not hosts:
        raise LaunchEnvError(f"empty Slurm node list {nodelist!r}")
    return hosts


def _split_top_level(text: str) -> list[str]:
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return [s.strip() for s in items if s.strip()]


def _expand(item: str, whole: str) -> list[str]:
    m = re.match(r"([^\[\]]*)\[([^\[\]]*)\](.*)$", item)
    if m is None:
        if "[" in item or "]" in item:
            raise LaunchEnvError(f"unbalanced brackets in Slurm node list {whole!r}")
        return [item]
    prefix, ranges, rest = m.groups()
    heads = []
    for r in ranges.split(","):
        lo, _, hi = r.strip().partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise LaunchEnvError(f"cannot parse range {r!r} in Slurm node list {whole!r}")
        width = len(lo)
        heads += [f"{prefix}{n:0{width}d}" for n in range(int(lo), int(hi or lo) + 1)]
    return [h + tail for h in heads for tail in _expand(rest, whole)]


# ---- MPI ----
# One entry per MPI flavour: the rank variable that identifies it, then candidate names for the
# world size, local rank and local size (first one set wins).
_MPI_FLAVOURS = (
    ("OMPI_COMM_WORLD_RANK", ("OMPI_COMM_WORLD_SIZE",), ("OMPI_COMM_WORLD_LOCAL_RANK",),
     ("OMPI_COMM_WORLD_LOCAL_SIZE",)),
    ("MV2_COMM_WORLD_RANK", ("MV2_COMM_WORLD_SIZE",), ("MV2_COMM_WORLD_LOCAL_RANK",),
     ("MV2_COMM_WORLD_LOCAL_SIZE",)),
    ("PMI_RANK", ("PMI_SIZE",), ("MPI_LOCALRANKID", "PMI_LOCAL_RANK"), ("MPI_LOCALNRANKS", "PMI_LOCAL_SIZE")),
    ("PMIX_RANK", ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE"), ("OMPI_COMM_WORLD_LOCAL_RANK", "PMIX_LOCAL_RANK"),
     ("OMPI_COMM_WORLD_LOCAL_SIZE", "PMIX_LOCAL_SIZE")),
)


def _has_mpi(environ: Mapping[str, str]) -> bool:
    return any(f[0] in environ for f in _MPI_FLAVOURS)


def _mpi(environ: Mapping[str, str]) -> LaunchEnv:
    rank_var, size_vars, local_rank_vars, local_size_vars = next(f for f in _MPI_FLAVOURS if f[0] in environ)
    size_var = _first_name(environ, *size_vars)
    if size_var is None:
        raise LaunchEnvError(f"{rank_var} is set but none of {', '.join(size_vars)} is; launch with "
                             "mpiexec/mpirun (OpenMPI, MPICH) or srun, or set RANK and WORLD_SIZE instead")
    rank, world = _int(environ, rank_var), _int(environ, size_var)
    local_rank_var, local_size_var = _first_name(environ, *local_rank_vars), _first_name(environ, *local_size_vars)
    if local_rank_var is not None and local_size_var is not None:
        local_rank, local_world = _int(environ, local_rank_var), _int(environ, local_size_var)
    else:  # the flavour does not say: assume one node
        local_rank, local_world = rank, world
    addr = environ.get("MASTER_ADDR")
    port = _int(environ, "MASTER_PORT", 0) if addr is not None else 0
    # MPI names no node index; with the usual block placement it is rank // local size.
    return LaunchEnv("mpi", rank, world, local_rank, local_world, rank // local_world, addr, port)


# ---- helpers ----
def _first(environ: Mapping[str, str], *names: str) -> Optional[str]:
    name = _first_name(environ, *names)
    return environ[name] if name is not None else None


def _first_name(environ: Mapping[str, str], *names: str) -> Optional[str]:
    return next((n for n in names if n in environ), None)


def _int(environ: Mapping[str, str], name: str, default: Optional[int] = None) -> int:
    if name not in environ:
        if default is None:
            raise LaunchEnvError(f"environment variable {name} is required by this launcher but not set")
        return default
    try:
        return int(environ[name])
    except ValueError:
        raise LaunchEnvError(f"environment variable {name}={environ[name]!r} is not an integer") from None
