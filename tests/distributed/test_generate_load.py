"""`axon.generate.load_model` reads a checkpoint written under tensor parallelism into the plain
single-process model: its loss on the batch of the next step equals the trainer's (rel 1e-5:
the same weights, only the summation order differs)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from axon.data import BatchSampler, open_dataset
from axon.generate import load_model
from tests.distributed.goldfish_driver import train_and_save
from tests.distributed.trainer_driver import make_cfg


def test_tp_checkpoint_loads_into_the_plain_model(tmp_path, dist_pools):
    cfg = make_cfg(tmp_path, "run", "parallel.tp_col=2", "train.steps=3", "checkpoint.every=2")
    losses = dist_pools.run(2, train_and_save, cfg)[0]
    model = load_model(cfg.run_dir / "checkpoints")  # the newest: step 2
    train = open_dataset(cfg.data, vocab_size=cfg.model.vocab_size).split("train")
    sampler = BatchSampler(len(train), cfg.train.seq_len, cfg.train.global_batch_size, cfg.train.seed)
    batch = sampler.local_batch(train, 2, 0, 1)  # [G, S+1], the third step's
    with torch.no_grad():
        loss = F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten()).item()
    assert loss == pytest.approx(losses[2], rel=1e-5)
