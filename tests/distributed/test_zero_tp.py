"""ZeRO 1-3 and optimizer offload composed with tensor parallelism (1D, with sequence parallelism,
and 3D with tp_depth) train exactly like the plain data-parallel trainer on the same layout
(same losses over several AdamW steps with global-norm clipping active), and a ZeRO-3 checkpoint
under tp_col, tp_depth or pipeline chunks resumes under another layout (no TP, ZeRO-1). Weight
decay is on: both paths decay by the full tensor's shape (a flat tp_depth slice of a matrix
decays).

The layout comparisons run the 2-layer model (two Blocks: ZeRO-3's per-Block gathers and frees
and the Block-to-Block hand-offs of TP and SP all still happen; only pipelines need 4 layers): the
TP collectives per Block are what cost time on gloo. Three steps: AdamW's first update is
sign-like (clipping cannot show in it), the third loss is the first to see clipping and the
optimizer state (and its ZeRO sharding) carried from the first update."""
from __future__ import annotations

import pytest

from tests.distributed.trainer_driver import STEPS as BASE
from tests.distributed.trainer_driver import make_cfg, train, train_all

# 2 sequences per microbatch: 2 microbatches per data-parallel rank (ZeRO-1's accumulation before its
# reduction still runs), half the collectives of tensor parallelism on gloo
STEPS = [*BASE, "parallel.micro_batch_size=2"]


@pytest.mark.parametrize("layout,world,extras", [
    (["parallel.tp_col=2", "parallel.dp=2"], 4,
     [[], ["parallel.zero=1"], ["parallel.zero=2"], ["parallel.zero=3"], ["parallel.zero=1", "parallel.offload.optimizer=true"]]),
    (["parallel.tp_col=2", "parallel.dp=2", "parallel.sequence_parallel=true"], 4,
     [[], ["parallel.zero=2"], ["parallel.zero=3", "parallel.offload.optimizer=true"]]),
    (["parallel.tp_col=2", "parallel.tp_depth=2", "parallel.dp=2"], 8,
     [[], ["parallel.zero=1"], ["parallel.zero=3"]]),
], ids=["tp2-dp2", "tp2-sp-dp2", "tp2-depth2-dp2"])
def test_zero_with_tp_matches_plain(layout, world, extras, tmp_path, dist_pools):
    cfgs = [make_cfg(tmp_path, f"v{i}", *layout, *extra, *STEPS, "model.n_layers=2")
            for i, extra in enumerate(extras)]
    ref, *got = dist_pools.run(world, train_all, cfgs)[0]
    assert ref[-1] < ref[0]
    for losses in got:
        assert losses == pytest.approx(ref, rel=1e-5)


@pytest.fixture(scope="module")
def resume_reference(tmp_path_factory, dist_pools):
    """The uninterrupted dp=2 run every resume below is compared with (STEPS holds 4 layers: the
    same model for every saved layout)."""
    cfg = make_cfg(tmp_path_factory.mktemp("ref"), "ref", "parallel.dp=2", *STEPS)
    return dist_pools.run(2, train_all, [cfg])[0][0]


@pytest.mark.parametrize("saved,model", [
    (["parallel.tp_col=2"], []),
    # flat depth slices of the weights, norms replicated over depth (a ZeRO group of 4)
    (["parallel.tp_depth=2"], []),
    # pipeline chunks: a V's two chunks per rank, the embedding and head on rank 0
    (["parallel.pp=2", "parallel.schedule=zbv", "parallel.virtual_stages=2"], ["model.n_layers=4"]),
], ids=["tp_col2", "tp_depth2", "pp2-zbv"])
def test_zero3_tp_checkpoint_resumes_as_zero1_without_tp(saved, model, resume_reference, tmp_path, dist_pools):
    ref = resume_reference
    dist_pools.run(4, train, make_cfg(tmp_path, "x", *saved, "parallel.dp=2", "parallel.zero=3",
                                      *STEPS, *model, "train.steps=2", "checkpoint.at_end=true"))
    start, rest = dist_pools.run(2, train, make_cfg(tmp_path, "x", "parallel.dp=2", "parallel.zero=1", *STEPS,
                                                    *model))[0]
    assert start == 2
    assert rest == pytest.approx(ref[2:], rel=1e-4)  # TP vs no TP: fp32 reduction-order noise (test_trainer_4d)
