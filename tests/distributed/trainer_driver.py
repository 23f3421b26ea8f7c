"""The tiny trainer runs the distributed trainer tests share: a config (`make_cfg`), one run on
every rank (`train`, `train_all`), and the clipped multi-step setting the parity tests compare
(`STEPS`, `variants`). Functions here run inside the worker pools (tests/distributed/harness.py)."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from axon import trainer
from axon.config import RunConfig, freeze, load
from launch.grid import Grid

TINY = ["model.n_layers=2", "train.seq_len=32", "train.global_batch_size=8", "train.lr=3e-3",
        "optim.warmup_steps=2", "logger.wandb.mode=disabled", "train.progress=false", "checkpoint.at_end=false"]
# clipping active: the global norm must be right; 4 layers so pipelines get several chunks
STEPS = ["train.steps=3", "optim.grad_clip=0.5", "model.n_layers=4"]


def make_cfg(tmp_path: Path, name: str, *overrides: str) -> RunConfig:
    """The tiny model's config, running in `tmp_path / name`, with Hydra `overrides` on top."""
    return freeze(load(TINY + [f"run.dir={tmp_path / name}", *overrides]))


def train(cfg: RunConfig) -> tuple[int, list[float]]:
    """Run the trainer on this rank: (the step it started from, its losses)."""
    grid = Grid.build(cfg.plan, dist.get_rank(), dist.get_world_size())
    r = trainer.run(cfg, grid, torch.device("cpu"))
    return r.start_step, r.losses


def train_all(cfgs: list[RunConfig]) -> list[list[float]]:
    """`train` each config in turn on this rank; the losses of each."""
    return [train(cfg)[1] for cfg in cfgs]


def variants(tmp_path: Path, layout: list[str], extras: list[list[str]]) -> list[RunConfig]:
    """One config per entry of `extras`: `layout` plus that entry, with STEPS, each in its own run dir."""
    return [make_cfg(tmp_path, f"v{i}", *layout, *extra, *STEPS) for i, extra in enumerate(extras)]
