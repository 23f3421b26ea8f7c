"""The non-finite guard (axon/nonfinite.py) on 2 gloo ranks: a NaN gradient on one rank stops
every rank before the update (train.on_nonfinite=stop) with the step and the parameter named and
no checkpoint at or after that step; with skip the update is dropped, counted and logged, and the
run finishes finite; a real divergence (train.lr=1e20) stops the same way."""
from __future__ import annotations

import json
import math

import torch
import torch.distributed as dist

from axon import checkpoint as ckpt
from axon.nonfinite import NonFiniteError
from parallel import grad_engine
from tests.distributed.trainer_driver import make_cfg, train

POISONED = "layers.1.mlp.w_up.weight"


def _poisoning_build(step: int, rank: int, build):
    """grad_engine.build whose engine, after its `step`-th finish() on `rank`, sets one element of
    POISONED's reduced gradient (or of the first ZeRO shard) to NaN: a fault after the reductions."""
    def wrapped(*args, **kwargs):
        engine = build(*args, **kwargs)
        finish, count = engine.finish, [0]

        def poisoned_finish() -> None:
            finish()
            count[0] += 1
            if count[0] == step and dist.get_rank() == rank:
                if hasattr(engine, "units"):
                    engine.units[-1].grad_shard[0] = float("nan")
                else:
                    engine.named[POISONED].grad.view(-1)[0] = float("nan")

        engine.finish = poisoned_finish
        return engine
    return wrapped


def run_poisoned(cfg, step: int, rank: int):
    """Train with a NaN injected at `step` on `rank`: ("ok", losses) or ("error", message)."""
    build = grad_engine.build
    grad_engine.build = _poisoning_build(step, rank, build)
    try:
        return "ok", train(cfg)[1]
    except NonFiniteError as e:
        return "error", str(e)
    finally:
        grad_engine.build = build


def steps_of(cfg) -> list[int]:
    return [int(p.name[len(ckpt.PREFIX):]) for p in ckpt.complete_checkpoints(cfg.run_dir / "checkpoints")]


def test_nan_on_one_rank_stops_every_rank_before_the_update(tmp_path, dist_pools):
    cfg = make_cfg(tmp_path, "stop", "parallel.dp=2", "train.steps=5", "checkpoint.every=1", "checkpoint.keep=10",
                   "checkpoint.at_end=true")
    out = dist_pools.run(2, run_poisoned, cfg, 3, 1)
    for kind, message in out:  # both ranks stop, with the same report
        assert kind == "error"
        assert "step 3" in message and POISONED in message and "train.on_nonfinite=skip" in message
    assert steps_of(cfg) == [1, 2]  # nothing written at or after the bad step


def test_skip_drops_the_update_and_the_run_finishes_finite(tmp_path, dist_pools):
    cfg = make_cfg(tmp_path, "skip", "parallel.dp=2", "parallel.zero=2", "train.steps=4",
                   "train.on_nonfinite=skip", "train.max_skips=1", "checkpoint.at_end=true")
    kind, losses = dist_pools.run(2, run_poisoned, cfg, 2, 0)[0]
    assert kind == "ok" and len(losses) == 4
    assert math.isnan(losses[1]) is False and all(math.isfinite(x) for x in losses)
    records = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("skipped_steps") for r in records] == [None, 1, None, None]
    assert not math.isfinite(records[1]["grad_norm"])
    assert steps_of(cfg) == [4]


def test_skips_beyond_max_skips_stop(tmp_path, dist_pools):
    cfg = make_cfg(tmp_path, "budget", "parallel.dp=2", "train.steps=3", "train.on_nonfinite=skip",
                   "train.max_skips=0")
    kind, message = dist_pools.run(2, run_poisoned, cfg, 2, 1)[0]
    assert kind == "error" and "train.max_skips=0" in message and "step 2" in message


def test_divergence_stops_with_no_checkpoint_written_after_it(tmp_path, dist_pools):
    cfg = make_cfg(tmp_path, "diverge", "train.lr=1e20", "optim.warmup_steps=0", "train.steps=8",
                   "checkpoint.every=1", "checkpoint.keep=10", "checkpoint.at_end=true")
    kind, message = dist_pools.run(1, run_poisoned, cfg, 0, 0)[0]  # step 0: no injection
    assert kind == "error"
    bad = int(message.split("step ")[1].split(":")[0])
    assert 1 < bad <= 8 and steps_of(cfg) == list(range(1, bad))
    assert all(torch.isfinite(torch.tensor(x)) for x in [json.loads(line)["loss"] for line in
               (cfg.run_dir / "metrics.jsonl").read_text().splitlines()])
