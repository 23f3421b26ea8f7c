"""Goldfish-loss runs the parity tests share: the trainer's per-step loss and (pre-clip) global
gradient norm on this rank (`steps`), and the single-process loss computed by hand from the
model, the batch and the mask (`manual_loss`). Functions here run inside the worker pools."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from axon import goldfish, trainer
from axon.config import RunConfig
from launch.grid import Grid


def steps(cfg: RunConfig) -> list[tuple[float, float]]:
    """(loss, gradient norm) of each of `cfg.train.steps` steps of a fresh trainer on this rank."""
    t = trainer.Trainer(cfg, Grid.build(cfg.plan, dist.get_rank(), dist.get_world_size()), torch.device("cpu"))
    try:
        outs = [t.step(s) for s in range(cfg.train.steps)]
    finally:
        t.engine.remove()
    return [(o["loss"], o["grad_norm"]) for o in outs]


def manual_loss(cfg: RunConfig) -> tuple[float, float]:
    """Single process: (the mean cross-entropy over the kept targets of step 0's batch, computed
    with F.cross_entropy on a boolean selection; the trainer's step-0 loss)."""
    t = trainer.Trainer(cfg, Grid.build(cfg.plan, 0, 1), torch.device("cpu"))
    try:
        batch = t.sampler.local_batch(t.train_data, 0, 0, 1)  # [G, S+1]
        keep = goldfish.keep_mask(batch, cfg.train.goldfish)  # [G, S]
        (model,) = t.pipe.chunks.values()
        with torch.no_grad():
            logits = model(batch[:, :-1])  # [G, S, V]
        expected = F.cross_entropy(logits[keep], batch[:, 1:][keep]).item()
        got = t.step(0)["loss"]
    finally:
        t.engine.remove()
    return expected, got


def train_and_save(cfg: RunConfig) -> list[float]:
    """Run the trainer (checkpointing by `cfg.checkpoint`) on this rank; its losses."""
    return trainer.run(cfg, Grid.build(cfg.plan, dist.get_rank(), dist.get_world_size()), torch.device("cpu")).losses
