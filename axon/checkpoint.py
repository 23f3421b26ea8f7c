"""Sharded, atomic, layout-independent checkpoints (torch.distributed.checkpoint) owned by a run.

Layout: `<run_dir>/checkpoints/step_00000042/` holding DCP shards and `.metadata`,
`rng/rank<N>.pt` and `axon.json` (step, run_id, sampler state, model shape, layout, and the file
manifest: every other file's size and sha256). Every rank writes into a temporary directory;
once all ranks finished and the manifest is recorded (hashing split over the ranks), rank 0
writes axon.json and renames the directory into place, so a crash mid-save leaves the previous
checkpoint intact. A same-step checkpoint is first moved aside (`.old_step_*`), then replaced,
then deleted; `recover` puts an aside copy back if a crash stranded it. State is keyed by
layout-independent parameter names, as the gradient engine presents it (`GradEngine.state_dict`:
sharded tensors as DTensors of the full tensor), so DCP reshards on load and a
checkpoint written under one layout resumes under another.

Loading never runs code from the checkpoint: the manifest is checked first (axon/checkpoint_manifest.py),
then `.metadata` is unpickled with an allowlist and tensors and RNG states are read with
torch.load(weights_only=True) (axon/checkpoint_reader.py). Each checkpoint names its run
(`run_id`): `checkpoint.resume=auto` and `checkpoint.keep` pruning see only this run's.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from axon import checkpoint_manifest as manifest
from axon.checkpoint_reader import CheckpointError, read_metadata, read_rng, read_state  # noqa: F401 - re-exported
from perfmodel.specs import ModelSpec, Plan

PREFIX = "step_"
META = "axon.json"
TMP, ASIDE, DOOMED = ".tmp_", ".old_", ".del_"  # dot-prefixed: never a complete checkpoint


def step_dir(root: Path, step: int) -> Path:
    return root / f"{PREFIX}{step:08d}"


# ---- finding checkpoints ----
def checkpoint_run_id(path: Path) -> Optional[str]:
    """The run id recorded in the checkpoint `path`; None when it has none or is unreadable."""
    try:
        run_id = json.loads((Path(path) / META).read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None
    return run_id if isinstance(run_id, str) else None


def complete_checkpoints(root: Path, run_id: Optional[str] = None) -> list[Path]:
    """Finished checkpoints under `root`, oldest first (dot-prefixed temporary, aside and doomed
    directories are ignored); with `run_id`, only that run's (one without a run id is foreign)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / META).is_file()]
    if run_id is not None:
        found = [p for p in found if checkpoint_run_id(p) == run_id]
    return sorted(found, key=lambda p: p.name)


def foreign_checkpoints(root: Path, run_id: Optional[str]) -> list[Path]:
    """Finished checkpoints under `root` not written by the run `run_id` (for a pre-spawn check)."""
    return [p for p in complete_checkpoints(root) if run_id is None or checkpoint_run_id(p) != run_id]


def resolve(resume: str, root: Path, run_id: Optional[str] = None) -> Optional[Path]:
    """`checkpoint.resume`: auto -> the newest of run `run_id`'s checkpoints under root (None: of
    any run) or None, never -> None, else that path (any run; a checkpoints/ directory: its newest)."""
    if resume == "never":
        return None
    if resume == "auto":
        found = complete_checkpoints(root, run_id)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / META).is_file():
        newest = complete_checkpoints(path)  # a checkpoints/ directory is accepted too
        if newest:
            return newest[-1]
        raise CheckpointError(f"checkpoint.resume={resume!r} is not a complete checkpoint (no {META}); "
                              f"point it at a step_* directory or use checkpoint.resume=auto|never")
    return path


def read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads((path / META).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} has an unreadable {META} ({e}); it is corrupted: delete it "
                              f"or set checkpoint.resume to another checkpoint") from e
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint {path} has a {META} that is not an object; it is corrupted: delete it "
                              f"or set checkpoint.resume to another checkpoint")
    return meta


# ---- saving ----
def save(root: Path, step: int, model_state: dict[str, Any], optim_state: dict[str, Any],
         meta: dict[str, Any], keep: int, run_id: str) -> Path:
    """Collective: every rank calls it. Returns the final directory. `keep` > 0 prunes run
    `run_id`'s oldest checkpoints beyond the newest `keep` (never another run's)."""
    rank = dist.get_rank()
    final = step_dir(root, step)
    tmp = root / f"{TMP}{final.name}"
    owner = checkpoint_run_id(final)
    if (final / META).is_file() and owner != run_id:  # every rank reads the same file: all raise
        whose = f"belongs to run {owner!r}" if owner else "has no run id (an older Axon's, or `axon convert`'s)"
        raise CheckpointError(f"checkpoint {final} {whose}, not to this run ({run_id!r}), and is not replaced; "
                              f"move it away or choose another run.dir")
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        recover(root)
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "rng").mkdir(parents=True)
    dist.barrier()
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp))
    _write_rng(tmp / "rng" / f"rank{rank}.pt")
    dist.barrier()
    files = manifest.record(tmp, META)  # collective; the whole manifest on rank 0
    if rank == 0:
        _write_meta(tmp, dict(meta, step=step, world_size=dist.get_world_size(), run_id=run_id), files)
        install(tmp, final)
        _prune(root, keep, run_id)
    dist.barrier()
    return final


def seal(directory: Path, meta: dict[str, Any]) -> None:
    """One process: record the manifest of `directory` (a finished DCP save, e.g. `axon convert`'s,
    not yet renamed into place) and write its axon.json with `meta` (which should carry run_id)."""
    _write_meta(directory, meta, manifest.record_local(directory, META))


def _write_meta(directory: Path, meta: dict[str, Any], files: dict[str, Any]) -> None:
    with open(directory / META, "w") as f:
        json.dump({**meta, manifest.MANIFEST_KEY: files}, f, indent=2, default=str)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(directory)


def _write_rng(file: Path) -> None:
    with open(file, "wb") as f:
        torch.save(_rng_state(), f)
        f.flush()
        os.fsync(f.fileno())


def install(tmp: Path, final: Path) -> None:
    """One process: rename the finished checkpoint directory `tmp` to `final`; an existing `final`
    is moved aside first and deleted last, so a crash leaves the old checkpoint (aside, put back
    by `recover`) or the new one."""
    aside = final.with_name(f"{ASIDE}{final.name}")
    shutil.rmtree(aside, ignore_errors=True)
    if final.exists():
        os.replace(final, aside)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    shutil.rmtree(aside, ignore_errors=True)


def recover(root: Path) -> None:
    """One process (rank 0): finish what a crash interrupted under `root`: an aside copy whose
    step has no checkpoint is put back, other aside and doomed directories are deleted."""
    if not root.is_dir():
        return
    for p in sorted(root.iterdir()):
        if p.name.startswith(ASIDE):
            final = p.with_name(p.name[len(ASIDE):])
            if final.exists():
                shutil.rmtree(p, ignore_errors=True)
            else:
                os.replace(p, final)
        elif p.name.startswith(DOOMED):
            shutil.rmtree(p, ignore_errors=True)
    _fsync_dir(root)


def _prune(root: Path, keep: int, run_id: Optional[str]) -> None:
    """Delete run `run_id`'s checkpoints beyond the newest `keep` (run_id None: those without one);
    each is renamed to a dot-prefixed name first, so a half-deleted one never looks complete."""
    if keep <= 0:
        return
    own = [p for p in complete_checkpoints(root) if checkpoint_run_id(p) == run_id]
    for old in own[:-keep]:
        doomed = old.with_name(f"{DOOMED}{old.name}")
        os.replace(old, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def _fsync_dir(directory: Path) -> None:
    """Persist a directory's entries (renames); skipped where the file system cannot."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---- loading ----
RUN_CHOICES = ("kernels", "gemm_tuning", "gemm_cache")  # model.* settings that choose an implementation, not the weights


def check_compatible(meta: dict[str, Any], model: ModelSpec, path: Path) -> None:
    saved = meta.get("model", {})
    diffs = [f"model.{k}: checkpoint {saved[k]!r} vs run {v!r}" for k, v in asdict(model).items()
             if k in saved and saved[k] != v and k not in RUN_CHOICES]
    if diffs:
        raise CheckpointError(f"checkpoint {path} was written for a different model ({'; '.join(diffs)}); "
                              f"set those model.* values to match or use checkpoint.resume=never")


def verify(path: Path, hashes: bool = True) -> dict[str, Any]:
    """Pure (no process group; for pre-spawn checks and tools): the checkpoint's files match its
    manifest in listing and size, and (`hashes`) sha256; returns its axon.json. CheckpointError if not."""
    meta = read_meta(path)
    manifest.verify(path, meta, META, hashes)
    return meta


def read(path: Path, state: dict[str, Any]) -> None:
    """Verify the checkpoint `path` (collectively when a process group is up, else here), then fill
    the tensors of `state` (e.g. {"model": {name: tensor}}) in place from it."""
    _verify(path, read_meta(path))
    _read_state(path, state)


def load(path: Path, model_state: dict[str, Any], optim_state: dict[str, Any]) -> None:
    """Collective: fills `model_state` / `optim_state` tensors in place from `path`, after checking
    every file against the manifest, and sets this rank's RNG state (when the checkpoint has it).
    A refused file is an error on every rank."""
    _verify(path, read_meta(path))
    rng = _read_own_rng(path)
    _read_state(path, {"model": model_state, "optim": optim_state})
    if rng is not None:
        _set_rng_state(rng)


def _read_own_rng(path: Path) -> Optional[dict[str, Any]]:
    """This rank's saved RNG state (None when absent: a checkpoint from fewer ranks or `axon
    convert`); a refused file on any rank raises on every rank."""
    file = path / "rng" / f"rank{dist.get_rank()}.pt"
    error: Optional[CheckpointError] = None
    state = None
    try:
        state = read_rng(file) if file.is_file() else None
    except CheckpointError as e:
        error = e
    if manifest.any_rank(error is not None) and error is None:
        raise CheckpointError(f"checkpoint {path}: another rank's RNG file was refused (its error names the file); "
                              f"delete the checkpoint or set checkpoint.resume to another one")
    if error is not None:
        raise error
    return state


def _verify(path: Path, meta: dict[str, Any]) -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        manifest.verify_collective(path, meta, META)
    else:
        manifest.verify(path, meta, META)


def _read_state(path: Path, state: dict[str, Any]) -> None:
    metadata = read_metadata(path)  # CheckpointError as it is: it names the file
    try:
        read_state(path, state, metadata)
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - DCP's is a BaseException; all mean unusable
        raise CheckpointError(f"could not load checkpoint {path}: {type(e).__name__}: {str(e)[:500]}; it is "
                              f"corrupted or does not match this model: delete it or set checkpoint.resume") from e


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def plan_meta(model: ModelSpec, plan: Plan, sampler_state: dict[str, Any]) -> dict[str, Any]:
    return {"model": asdict(model), "plan": plan.to_dict(), "sampler": sampler_state}
