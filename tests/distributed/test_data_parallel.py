"""Data parallelism: dp=4 trains exactly like dp=1 (same global batch, summed gradients), and the
bucketed reduction really overlaps (buckets launched during backward) and skips non-final
microbatches."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from axon import trainer
from launch.grid import Grid
from tests.distributed.trainer_driver import make_cfg


def train_on_ranks(cfg):
    grid = Grid.build(cfg.plan, dist.get_rank(), dist.get_world_size())
    result = trainer.run(cfg, grid, torch.device("cpu"))
    return result.losses


def dp_bucket_stats(cfg):
    grid = Grid.build(cfg.plan, dist.get_rank(), dist.get_world_size())
    t = trainer.Trainer(cfg, grid, torch.device("cpu"))
    t.step(0)
    stats = t.engine.reset_stats()  # the data-parallel engine's DataParallel counters
    t.engine.remove()
    return stats.launched_in_backward, stats.buckets, stats.bytes_reduced


def test_dp4_matches_dp1_over_10_steps(tmp_path, dist_pools):
    steps = ["train.steps=10"]
    ref = dist_pools.run(1, train_on_ranks, make_cfg(tmp_path, "dp1", *steps))[0]
    got = dist_pools.run(4, train_on_ranks, make_cfg(tmp_path, "dp4", "parallel.dp=4", *steps))
    assert all(g == got[0] for g in got)  # every rank reports the same (all-reduced) loss
    assert ref[-1] < ref[0] and len(ref) == len(got[0]) == 10
    for a, b in zip(ref, got[0]):
        assert a == pytest.approx(b, rel=1e-5)


def test_dp2_with_accumulation_and_no_overlap_matches(tmp_path, dist_pools):
    steps = ["train.steps=3"]
    ref = dist_pools.run(1, train_on_ranks, make_cfg(tmp_path, "a1", *steps))[0]
    got = dist_pools.run(2, train_on_ranks, make_cfg(tmp_path, "a2", "parallel.dp=2", "parallel.micro_batch_size=2",
                                                     "parallel.overlap_grad_reduce=false", *steps))[0]
    assert got == pytest.approx(ref, rel=1e-5)


def test_buckets_launch_during_backward(tmp_path, dist_pools):
    cfg = make_cfg(tmp_path, "b", "parallel.dp=2", "parallel.bucket_mb=0.25", "parallel.micro_batch_size=1")
    launched, buckets, nbytes = dist_pools.run(2, dp_bucket_stats, cfg)[0]
    assert buckets > 4
    assert launched == buckets  # every bucket went out from a backward hook, none at finish()
    from perfmodel.flops import n_params

    assert nbytes == 4 * n_params(cfg.model)  # one all-reduce of every fp32 gradient per step
