"""The Goldfish loss under every layout family matches the single-process run, and the
single-process run matches the loss computed by hand (the mean over the kept targets).

Tolerances: the first step's loss and pre-clip global gradient norm at rel 1e-5 (fp32, no
optimizer step yet: only summation order differs between layouts). Later losses at rel 1e-4,
as in test_trainer_4d.py: AdamW divides each gradient element by its own RMS, so fp32 noise in
near-zero gradient elements moves the next loss at the 1e-5..1e-4 level.

Tensor- and context-parallel layouts run 2 samples per microbatch (2-4 microbatches per rank and
step: accumulation still runs, and the Goldfish mask, a function of each sample's tokens, does not
depend on the grouping): their time is per-microbatch collectives on gloo."""
from __future__ import annotations

import pytest

from tests.distributed.goldfish_driver import manual_loss, steps
from tests.distributed.trainer_driver import STEPS, make_cfg

GOLDFISH = ["train.goldfish.k=4", "train.goldfish.h=3"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, dist_pools):
    return dist_pools.run(1, steps, make_cfg(tmp_path_factory.mktemp("ref"), "ref", *STEPS, *GOLDFISH))[0]


def test_single_process_loss_is_the_mean_over_kept_tokens(tmp_path, dist_pools):
    for mode in ("hash", "static"):
        cfg = make_cfg(tmp_path, mode, *STEPS, *GOLDFISH, f"train.goldfish.mode={mode}")
        expected, got = dist_pools.run(1, manual_loss, cfg)[0]
        assert got == pytest.approx(expected, rel=1e-6)


def test_goldfish_changes_the_loss(reference, tmp_path, dist_pools):
    plain = dist_pools.run(1, steps, make_cfg(tmp_path, "plain", *STEPS))[0]
    assert plain[0][0] != pytest.approx(reference[0][0], rel=1e-4)


@pytest.mark.parametrize("layout,world", [
    (["parallel.dp=2"], 2),
    (["parallel.dp=2", "parallel.zero=2"], 2),
    (["parallel.dp=2", "parallel.zero=3"], 2),
    (["parallel.tp_col=2", "parallel.tp_row=2", "parallel.micro_batch_size=2"], 4),  # vocab-parallel cross-entropy
    (["parallel.tp_row=2", "parallel.tp_depth=2", "parallel.micro_batch_size=2"], 4),
    (["parallel.pp=2", "parallel.dp=2", "parallel.micro_batch_size=2"], 4),
    (["parallel.cp=2", "parallel.dp=2", "parallel.micro_batch_size=2"], 4),  # ring, zig-zag shards
    (["parallel.cp=2", "parallel.cp_mode=ulysses", "parallel.micro_batch_size=2"], 2),
], ids=lambda v: "-".join(x.split(".")[-1] for x in v) if isinstance(v, list) else str(v))
def test_layout_matches_single_process(reference, layout, world, tmp_path, dist_pools):
    got = dist_pools.run(world, steps, make_cfg(tmp_path, "run", *layout, *STEPS, *GOLDFISH))[0]
    (loss0, norm0), (ref_loss0, ref_norm0) = got[0], reference[0]
    assert loss0 == pytest.approx(ref_loss0, rel=1e-5)
    assert norm0 == pytest.approx(ref_norm0, rel=1e-5)
    assert [loss for loss, _ in got] == pytest.approx([loss for loss, _ in reference], rel=1e-4)
