"""The checks `axon train` (and `axon submit`) make before any worker starts or any process group
exists, so bad input is one line and exit code 2, never a traceback buried under other ranks'
errors. Read-only: nothing is created or written.

    preflight.check(cfg, world, estimate, local_ranks)    # axon/train.py _main, after resolve_plan
    preflight.check_output_file(path, "--out")            # axon tune's output files
    preflight.check_writable(directory, "--out")          # a directory to create (prepare-data)

Settings' ranges are checked when the config is frozen (each type's RANGES, axon/config.py and
perfmodel/specs.py), the layout by perfmodel/rules.py (train.resolve_plan), the backend by
launch/dist.py (train.resolve_launch). This module adds what needs the file system or several
settings at once: the cluster settings only the performance model prices (perfmodel/rules.py
`training_cluster_rules`), the Goldfish settings (axon/goldfish.py), the run directory, the data files
(axon/data.py), the checkpoint a resume would load (axon/checkpoint.py), and memory. The modules
needing torch are imported where used: `axon tune` and `axon prepare-data` use the path checks
without torch.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from axon.config import RunConfig

if TYPE_CHECKING:
    from axon.data import DataInfo

GiB = 2**30
# The performance model's per-rank memory (perfmodel/memory.py) is an estimate: activations and the
# allocator's slack (cluster.overhead_bytes) are modelled, not measured. A run is refused only when
# the estimate exceeds the available memory by more than this factor; a borderline run is left to try.
MEMORY_MARGIN = 1.25


class PreflightError(ValueError):
    """Bad input found before start-up; the message names the setting and the fix."""


def check(cfg: RunConfig, world: int, estimate: Optional[dict[str, Any]] = None, local_ranks: int = 1,
          host_bytes: Optional[float] = None) -> None:
    """Raise (one line naming the setting) when `cfg` cannot run on `world` ranks, `local_ranks` of
    them on this node; `estimate`: the performance model's (train.resolve_plan), for memory;
    `host_bytes`: a node's memory for a CPU run (None = this machine's)."""
    from axon import data as data_mod
    from axon import goldfish, run_dir
    from perfmodel import rules

    rules.raise_if(rules.training_cluster_rules(cfg.cluster))
    goldfish.check(cfg.train.goldfish)
    check_run_location(cfg.run_name, cfg.run_dir)
    run_dir.preflight(cfg.run_dir, cfg.checkpoint.resume)  # another run's checkpoints, a live job
    info = data_mod.inspect(cfg.data)
    data_mod.check_vocab(info, cfg.model.vocab_size)
    data_mod.check_batch(info, cfg.train.seq_len, cfg.train.global_batch_size)
    check_resume(cfg, info)
    if estimate is not None:
        check_memory(cfg, estimate, local_ranks, host_bytes)


# ---- run directory ----
def check_run_location(name: str, directory: Path) -> None:
    """run.name is a plain name; run.dir has no Slurm pattern and can be created or written."""
    if not name or name in (".", "..") or re.search(r"[/\\%\x00-\x1f]", name) or os.path.isabs(name):
        raise PreflightError(f"run.name={name!r} must be a plain name (no '/', '\\', '%', '..' or control "
                             f"characters); set run.name=<name>, or run.dir=<path> to place the run elsewhere")
    if "%" in str(directory):
        raise PreflightError(f"run.dir={str(directory)!r} contains '%', which Slurm expands in the log path "
                             f"(%j = job id); choose a run.dir without '%'")
    if directory.exists() and not directory.is_dir():
        raise PreflightError(f"run.dir={str(directory)!r} is a file, not a directory; choose another run.dir "
                             f"(or run.name)")
    check_writable(directory, "run.dir")


def check_writable(path: Path, setting: str) -> None:
    """`path` (a directory, existing or not) can be created and written by this process."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise PreflightError(f"{setting}={str(path)!r} cannot be created: {probe} is a file; choose another {setting}")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise PreflightError(f"{setting}={str(path)!r} is not writable ({probe} is read-only for this user); "
                             f"choose a {setting} you can write to")


def check_output_file(path: Path, option: str) -> None:
    """`path` is a file this process can create or overwrite in an existing directory."""
    if path.is_dir():
        raise PreflightError(f"{option} {path} is a directory; give a file path")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise PreflightError(f"{option} {path}: the directory {parent} does not exist; create it or choose "
                             f"another {option}")
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise PreflightError(f"{option} {path} is not writable by this user; choose another {option}")


# ---- resume ----
def check_resume(cfg: RunConfig, info: DataInfo) -> None:
    """The checkpoint checkpoint.resume would load matches this run's model and batch (the
    rules axon/checkpoint.py and the data sampler apply again when loading)."""
    from axon import checkpoint as ckpt
    from axon import data as data_mod
    from axon import run_dir

    try:  # the run's own checkpoints, as the trainer resolves them (run_dir.read_id: read-only)
        path = ckpt.resolve(cfg.checkpoint.resume, cfg.run_dir / "checkpoints", run_dir.read_id(cfg.run_dir))
    except ckpt.CheckpointError as e:  # a setting naming no checkpoint: bad input
        raise PreflightError(str(e)) from None
    if path is None:
        return
    meta = ckpt.read_meta(path)  # unreadable: CheckpointError (exit code 3, as in the workers)
    try:
        ckpt.check_compatible(meta, cfg.model, path)
    except ckpt.CheckpointError as e:  # the settings differ from the checkpoint's: bad input
        raise PreflightError(str(e)) from None
    if meta.get("sampler") is not None:  # a checkpoint from `axon convert` has no data position
        t = cfg.train
        data_mod.check_sampler_state(meta["sampler"], data_mod.sampler_state(t.seed, t.seq_len,
                                                                             t.global_batch_size, info.train_tokens))


# ---- memory ----
def check_memory(cfg: RunConfig, estimate: dict[str, Any], local_ranks: int, host_bytes: Optional[float]) -> None:
    """The performance model's per-rank memory against what a rank has (MEMORY_MARGIN allowed)."""
    mem = estimate["memory"]
    have, where = available_bytes(cfg, local_ranks, host_bytes)
    if mem["total"] <= have * MEMORY_MARGIN:
        return
    parts = ", ".join(f"{k} {mem[k] / GiB:.1f}" for k in ("params", "grads", "optimizer", "activations") if mem[k])
    raise PreflightError(f"the performance model predicts {mem['total'] / GiB:,.1f} GiB per rank ({parts}) but "
                         f"{where} is {have / GiB:,.1f} GiB; {fit_hint(cfg)}")


def available_bytes(cfg: RunConfig, local_ranks: int, host_bytes: Optional[float]) -> tuple[float, str]:
    """A rank's memory and where the number comes from: the cluster preset's device memory on GPUs,
    else the node's memory shared by its ranks."""
    from launch.dist import CPU_CLUSTERS

    if cfg.cluster.name not in CPU_CLUSTERS:
        return cfg.cluster.hbm_bytes, f"a GPU of cluster={cfg.cluster.name} (cluster.hbm_bytes)"
    total = host_memory() if host_bytes is None else host_bytes
    ranks = max(1, local_ranks)
    return total / ranks, f"this node's memory / {ranks} local rank(s)"


def host_memory() -> float:
    """This machine's memory, or the container's limit (cgroup v2 memory.max) when lower."""
    total = float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
    except OSError:
        return total
    return min(total, float(limit)) if limit.isdigit() else total


def fit_hint(cfg: RunConfig) -> str:
    """The knobs that lower the per-rank memory, from this run's layout."""
    p = cfg.plan
    sets = [f"parallel.{k}={v}" for k, v, now in (("zero", 3, p.zero), ("recompute", "full", p.recompute),
                                                   ("offload.optimizer", "true", p.offload.optimizer))
            if str(now).lower() != str(v)]
    lower = "lower parallel.micro_batch_size, " if p.micro_batch_size > 1 else ""
    return (f"to fit, set {', '.join(sets) + ', ' if sets else ''}raise parallel.tp_col or parallel.pp (or use "
            f"parallel=auto), {lower}add ranks, or shrink the model (model.d_model, model.n_layers) or train.seq_len")
