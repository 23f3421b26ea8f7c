"""Checkpoints: an interrupted-and-resumed run equals an uninterrupted one; a checkpoint written at
dp=4 resumes at dp=2; keep-last-K; a crash mid-save leaves the previous checkpoint usable;
corrupted or mismatched checkpoints give a clear error."""
from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest

from axon import checkpoint as ckpt
from axon.checkpoint import CheckpointError
from tests.distributed.trainer_driver import make_cfg, train


def try_train(cfg):
    try:
        train(cfg)
    except CheckpointError as e:
        return str(e)
    return None


def metrics_steps(run_dir):
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_interrupted_and_resumed_equals_uninterrupted(tmp_path, dist_pools):
    full = dist_pools.run(2, train, make_cfg(tmp_path, "full", "parallel.dp=2", "train.steps=8"))[0][1]
    first = make_cfg(tmp_path, "resumed", "parallel.dp=2", "train.steps=8", "checkpoint.every=3", "checkpoint.keep=2",
                     "checkpoint.at_end=true")
    # "crash" after step 5: run only 5 of the 8 steps (checkpoints at 3; none at the end)
    dist_pools.run(2, train, replace(first, train=replace(first.train, steps=5),
                                     checkpoint=replace(first.checkpoint, at_end=False)))
    assert [p.name for p in ckpt.complete_checkpoints(first.run_dir / "checkpoints")] == ["step_00000003"]
    start, rest = dist_pools.run(2, train, first)[0]
    assert start == 3
    assert rest == pytest.approx(full[3:], rel=1e-6)
    assert metrics_steps(first.run_dir) == list(range(1, 9))  # every step logged exactly once
    # keep=2: checkpoints at 6 and the final 8 remain
    assert [p.name for p in ckpt.complete_checkpoints(first.run_dir / "checkpoints")] == \
        ["step_00000006", "step_00000008"]


def test_checkpoint_at_dp4_resumes_at_dp2(tmp_path, dist_pools):
    ref = dist_pools.run(1, train, make_cfg(tmp_path, "ref", "train.steps=6"))[0][1]
    dist_pools.run(4, train, make_cfg(tmp_path, "x", "parallel.dp=4", "train.steps=3", "checkpoint.at_end=true"))
    start, rest = dist_pools.run(2, train, make_cfg(tmp_path, "x", "parallel.dp=2", "train.steps=6"))[0]
    assert start == 3
    assert rest == pytest.approx(ref[3:], rel=1e-5)


def test_crash_mid_save_keeps_previous_and_errors_are_clear(tmp_path, dist_pools):
    cfg = make_cfg(tmp_path, "c", "train.steps=2", "checkpoint.at_end=true")
    dist_pools.run(1, train, cfg)
    root = cfg.run_dir / "checkpoints"
    good = ckpt.complete_checkpoints(root)[-1]
    # a save that died half way: a temporary directory with some shards and no axon.json
    partial = root / ".tmp_step_00000004"
    shutil.copytree(good, partial)
    (partial / ckpt.META).unlink()
    assert ckpt.resolve("auto", root) == good
    # a model mismatch is named
    other = make_cfg(tmp_path, "c", "train.steps=4", "model.d_ff=256")
    msg = dist_pools.run(1, try_train, other)[0]
    assert msg is not None and "model.d_ff" in msg
    # a corrupted shard file is reported, not a crash deep inside DCP
    for shard in good.glob("*.distcp"):
        shard.write_bytes(b"garbage")
    msg = dist_pools.run(1, try_train, make_cfg(tmp_path, "c", "train.steps=4"))[0]
    assert msg is not None and "corrupted" in msg and str(good) in msg
    with pytest.raises(CheckpointError, match="checkpoint.resume"):
        ckpt.resolve(str(tmp_path / "nowhere"), root)
