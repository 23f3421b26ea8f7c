"""Training on packed instruction data (axon/sft_data.py): the single-process loss is the mean
cross-entropy over the response tokens, each document seen alone; data, pipeline, context (ring
and Ulysses) and tensor (+ sequence) parallelism give the same losses.

Tolerances: rel 1e-5 on every step's loss and the first step's pre-clip gradient norm (fp32; the
layouts differ only in summation order); the hand-computed loss at rel 1e-5 (masked attention on
packed rows vs each document alone: fp32 reduction order)."""
from __future__ import annotations

import pytest

from tests.distributed.goldfish_driver import steps
from tests.distributed.sft_driver import make_data, manual_loss
from tests.distributed.trainer_driver import STEPS, make_cfg


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("sft")
    return [f"data.path={make_data(folder, seq_len=64)}", "train.seq_len=64", "data.val_fraction=0"]


@pytest.fixture(scope="module")
def reference(packed, tmp_path_factory, dist_pools):
    return dist_pools.run(1, steps, make_cfg(tmp_path_factory.mktemp("ref"), "ref", *STEPS, *packed))[0]


def test_single_process_loss_is_the_mean_over_response_tokens(packed, tmp_path, dist_pools):
    expected, got = dist_pools.run(1, manual_loss, make_cfg(tmp_path, "manual", *STEPS, *packed))[0]
    assert got == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("layout", [
    ["parallel.dp=2"],
    ["parallel.pp=2", "parallel.micro_batch_size=2"],  # per-sample positions through the executor
    ["parallel.cp=2"],  # ring: document starts travel with K/V
    ["parallel.cp=2", "parallel.cp_mode=ulysses"],  # positions all-gathered for the inner core
    ["parallel.tp_col=2", "parallel.sequence_parallel=true"],
], ids=["dp2", "pp2", "ring2", "ulysses2", "tp2sp"])
def test_layout_matches_single_process(packed, reference, layout, tmp_path, dist_pools):
    got = dist_pools.run(2, steps, make_cfg(tmp_path, "run", *layout, *STEPS, *packed))[0]
    assert got[0][1] == pytest.approx(reference[0][1], rel=1e-5)
    assert [loss for loss, _ in got] == pytest.approx([loss for loss, _ in reference], rel=1e-5)


@pytest.mark.parametrize("recompute", ["selective", "full"])
def test_recomputation_keeps_documents_apart(packed, reference, recompute, tmp_path, dist_pools):
    got = dist_pools.run(1, steps, make_cfg(tmp_path, recompute, f"parallel.recompute={recompute}", *STEPS, *packed))[0]
    assert [loss for loss, _ in got] == pytest.approx([loss for loss, _ in reference], rel=1e-5)
