"""The validation loss (train.eval_every, train.eval_batches; axon/evaluate.py): the same value
under every layout as in a single process, the plain model's mean cross-entropy over the same
held-out windows, and no effect on training (bit-identical losses with and without it).

Parity runs use train.lr=0 so the weights after each step equal the initial, layout-independent
ones: the comparison then isolates the forward-only evaluation (AdamW's sign-like first steps
would turn fp32 summation-order noise into 1e-5..1e-4 loss differences, test_trainer_4d.py)."""
from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from axon.data import open_dataset
from axon.trainer import Trainer
from launch.grid import Grid
from tests.distributed.trainer_driver import make_cfg, train

EVAL = ["train.eval_every=1", "train.eval_batches=2", "train.steps=2", "train.lr=0", "model.n_layers=4"]
TOL = 1e-5


def val_losses(cfg) -> dict[int, float]:
    """Run the trainer on this rank; its validation losses by step."""
    from axon import trainer
    grid = Grid.build(cfg.plan, dist.get_rank(), dist.get_world_size())
    return trainer.run(cfg, grid, torch.device("cpu")).val_losses


def by_hand(cfg) -> tuple[float, float]:
    """(the trainer's val_loss after two steps, the plain model's mean cross-entropy over the same
    windows: the val split's first eval_batches x global_batch_size windows, in order)."""
    trainer = Trainer(cfg, Grid.build(cfg.plan, 0, 1), torch.device("cpu"))
    try:
        for step in range(2):
            trainer.step(step)
        got = trainer.evaluate()
        model = trainer.pipe.chunks[0]  # one chunk: the whole model
        seq, n = cfg.train.seq_len, cfg.train.eval_batches * cfg.train.global_batch_size
        tokens = open_dataset(cfg.data, cfg.model.vocab_size).split("val").tokens
        windows = torch.tensor(tokens[:n * (seq + 1)].astype("int64")).view(n, seq + 1)  # [n, S+1]
        with torch.no_grad():
            logits = model(windows[:, :-1])  # [n, S, V]
            want = F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten()).item()
        return got, want
    finally:
        trainer.engine.remove()


@pytest.fixture(scope="module")
def reference(tmp_path_factory, dist_pools):
    got = dist_pools.run(1, val_losses, make_cfg(tmp_path_factory.mktemp("ref"), "ref", *EVAL))[0]
    assert sorted(got) == [1, 2]
    return got


@pytest.mark.parametrize("layout,world", [
    (["parallel.dp=2"], 2),
    (["parallel.pp=2", "parallel.schedule=1f1b", "parallel.micro_batch_size=2"], 2),
    (["parallel.pp=2", "parallel.schedule=interleaved", "parallel.virtual_stages=2"], 2),
    (["parallel.dp=2", "parallel.zero=3"], 2),
    (["parallel.tp_col=2"], 2),
], ids=lambda v: "-".join(x.split(".")[-1] for x in v) if isinstance(v, list) else str(v))
def test_val_loss_matches_single_process(reference, layout, world, tmp_path, dist_pools):
    per_rank = dist_pools.run(world, val_losses, make_cfg(tmp_path, "run", *layout, *EVAL))
    for got in per_rank:  # every rank returns the same value
        assert got.keys() == reference.keys()
        for step, v in got.items():
            assert v == pytest.approx(reference[step], rel=TOL), (step, layout)


def test_goldfish_does_not_apply_to_validation(reference, tmp_path, dist_pools):
    got = dist_pools.run(1, val_losses, make_cfg(tmp_path, "g", *EVAL, "train.goldfish.k=2"))[0]
    assert got == pytest.approx(reference, rel=TOL)


def test_val_loss_by_hand(tmp_path, dist_pools):
    got, want = dist_pools.run(1, by_hand, make_cfg(tmp_path, "h", "train.eval_every=1", "train.eval_batches=2"))[0]
    assert got == pytest.approx(want, rel=TOL)


@pytest.mark.parametrize("layout,world", [
    ([], 1),
    (["parallel.pp=2", "parallel.schedule=interleaved", "parallel.virtual_stages=2"], 2),
    (["parallel.dp=2", "parallel.zero=3"], 2),
], ids=["single", "pp2-interleaved", "zero3"])
def test_eval_does_not_change_training(layout, world, tmp_path, dist_pools):
    common = [*layout, "train.steps=3", "model.n_layers=4", "optim.grad_clip=0.5", "train.log_every=3"]
    plain = dist_pools.run(world, train, make_cfg(tmp_path, "plain", *common))[0][1]
    cfg = make_cfg(tmp_path, "eval", *common, "train.eval_every=2", "train.eval_batches=1")
    with_eval = dist_pools.run(world, train, cfg)[0][1]
    assert with_eval == plain  # bit-identical
    records = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], "val_loss" in r) for r in records] == [(2, True), (3, True)]  # at every 2 and the end



def in_turn(*cfgs) -> tuple[dict[int, float], int, dict[int, float]]:
    """Run each config in turn on this rank (one run directory: each resumes the one before):
    (training losses by step, the last run's start step, validation losses by step)."""
    from axon import trainer
    losses, val = {}, {}
    for cfg in cfgs:
        r = trainer.run(cfg, Grid.build(cfg.plan, dist.get_rank(), dist.get_world_size()), torch.device("cpu"))
        losses.update(zip(r.steps, r.losses))
        val.update(r.val_losses)
    return losses, r.start_step, val


def test_resume_with_eval_is_exact(tmp_path, dist_pools):
    common = ["model.n_layers=4", "parallel.pp=2", "train.eval_every=1", "train.eval_batches=1",
              "checkpoint.at_end=true"]
    whole = dist_pools.run(2, in_turn, make_cfg(tmp_path, "w", *common, "train.steps=3"))[0]
    split = dist_pools.run(2, in_turn, make_cfg(tmp_path, "s", *common, "train.steps=2"),
                           make_cfg(tmp_path, "s", *common, "train.steps=3"))[0]
    assert (whole[1], split[1]) == (0, 2)
    assert split[0] == whole[0] and split[2] == whole[2] and sorted(split[2]) == [1, 2, 3]
