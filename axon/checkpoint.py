"""Sharded, atomic, layout-independent checkpoints (torch.distributed.checkpoint).

Layout: `<run_dir>/checkpoints/step_00000042/` holding DCP shards, `axon.json` (step, sampler
state, model shape, layout) and `rng/rank<N>.pt`. Every rank writes into a temporary directory
that rank 0 renames into place only after all ranks finished, so a crash mid-save leaves the
previous checkpoint intact. State is keyed by layout-independent parameter names, as the
gradient engine presents it (`GradEngine.state_dict`: sharded tensors as DTensors or
ShardedTensors of the full tensor), so DCP reshards on load and a checkpoint written under one
layout resumes under another.
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

from perfmodel.specs import ModelSpec, Plan

PREFIX = "step_"
META = "axon.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message says which and what to do."""


def step_dir(root: Path, step: int) -> Path:
    return root / f"{PREFIX}{step:08d}"


def complete_checkpoints(root: Path) -> list[Path]:
    """Finished checkpoints under `root`, oldest first (temporary directories are ignored)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / META).is_file()]
    return sorted(found, key=lambda p: p.name)


def resolve(resume: str, root: Path) -> Optional[Path]:
    """`checkpoint.resume`: auto -> newest under root (or None), never -> None, else that path."""
    if resume == "never":
        return None
    if resume == "auto":
        found = complete_checkpoints(root)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / META).is_file():
        newest = complete_checkpoints(path)  # a checkpoints/ directory is accepted too
        if newest:
            return newest[-1]
        raise CheckpointError(f"checkpoint.resume={resume!r} is not a complete checkpoint (no {META}); "
                              f"point it at a step_* directory or use checkpoint.resume=auto|never")
    return path


def save(root: Path, step: int, model_state: dict[str, Any], optim_state: dict[str, Any],
         meta: dict[str, Any], keep: int) -> Path:
    """Collective: every rank calls it. Returns the final directory."""
    rank = dist.get_rank()
    final = step_dir(root, step)
    tmp = root / f".tmp_{final.name}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        (tmp / "rng").mkdir()
    dist.barrier()
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp))
    torch.save(_rng_state(), tmp / "rng" / f"rank{rank}.pt")
    dist.barrier()
    if rank == 0:
        with open(tmp / META, "w") as f:
            json.dump(dict(meta, step=step, world_size=dist.get_world_size()), f, indent=2, default=str)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in complete_checkpoints(root)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def read_meta(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / META).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {path} has an unreadable {META} ({e}); it is corrupted: delete it "
                              f"or set checkpoint.resume to another checkpoint") from e


RUN_CHOICES = ("kernels",)  # model.* settings that choose an implementation, not the weights


def check_compatible(meta: dict[str, Any], model: ModelSpec, path: Path) -> None:
    saved = meta.get("model", {})
    diffs = [f"model.{k}: checkpoint {saved[k]!r} vs run {v!r}" for k, v in asdict(model).items()
             if k in saved and saved[k] != v and k not in RUN_CHOICES]
    if diffs:
        raise CheckpointError(f"checkpoint {path} was written for a different model ({'; '.join(diffs)}); "
                              f"set those model.* values to match or use checkpoint.resume=never")


def load(path: Path, model_state: dict[str, Any], optim_state: dict[str, Any]) -> None:
    """Collective: fills `model_state` / `optim_state` tensors in place from `path`."""
    try:
        dcp.load({"model": model_state, "optim": optim_state}, checkpoint_id=str(path))
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - DCP's is a BaseException; all mean unusable
        raise CheckpointError(f"could not load checkpoint {path}: {type(e).__name__}: {str(e)[:500]}; it is "
                              f"corrupted or does not match this model: delete it or set checkpoint.resume") from e
    rng = path / "rng" / f"rank{dist.get_rank()}.pt"
    if rng.is_file():
        _set_rng_state(torch.load(rng, weights_only=False))


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
