"""The full trainer under tensor and context parallelism (and their mix with data parallelism)
matches the single-process run: the same losses over several AdamW steps with the global-norm
clipping active, and checkpoints resume across layouts.

Tolerance: relative 1e-4 on the loss after AdamW steps. Gradients themselves match at 1e-5
(tests/distributed/test_tensor.py, test_context_model.py); AdamW divides each gradient element by
its own RMS, so an element whose gradient is near zero moves by about lr whatever its sign, and
fp32 summation-order noise in such elements (different layouts sum in different orders) shows up
in the next loss at the 1e-5..1e-4 level.

Tensor- and context-parallel layouts run 2 samples per microbatch (still 2-4 microbatches per rank
and step, so gradient accumulation runs): their time is per-microbatch collectives on gloo, and the
loss of a step does not depend on how its samples are grouped (the reference runs 1 per microbatch).
Three steps: AdamW's first update is sign-like, so the clipping (a rescaling of the gradient) shows
first in the third loss."""
from __future__ import annotations

import pytest

from tests.distributed.trainer_driver import STEPS, make_cfg, train


@pytest.fixture(scope="module")
def reference(tmp_path_factory, dist_pools):
    return dist_pools.run(1, train, make_cfg(tmp_path_factory.mktemp("ref"), "ref", *STEPS))[0][1]


@pytest.mark.parametrize("layout,world", [
    (["parallel.tp_col=2", "parallel.dp=2", "parallel.micro_batch_size=2"], 4),
    (["parallel.tp_col=2", "parallel.sequence_parallel=true", "parallel.micro_batch_size=2"], 2),
    (["parallel.tp_row=2", "parallel.tp_depth=2", "parallel.micro_batch_size=2"], 4),
    (["parallel.cp=2", "parallel.dp=2", "parallel.micro_batch_size=2"], 4),
    (["parallel.cp=2", "parallel.cp_mode=ulysses", "parallel.micro_batch_size=2"], 2),
    (["parallel.cp=2", "parallel.tp_col=2", "parallel.micro_batch_size=2"], 4),
    (["parallel.pp=2", "parallel.dp=2", "parallel.micro_batch_size=2"], 4),
    (["parallel.pp=2", "parallel.schedule=interleaved", "parallel.virtual_stages=2"], 2),
    (["parallel.pp=2", "parallel.dp=2", "parallel.schedule=zbv", "parallel.virtual_stages=2",
      "parallel.offload.activations=0.5"], 4),
    (["parallel.pp=2", "parallel.tp_col=2", "parallel.dp=2", "parallel.sequence_parallel=true",
      "parallel.micro_batch_size=2"], 8),
    (["parallel.pp=2", "parallel.cp=2", "parallel.micro_batch_size=2"], 4),
    # ZeRO-3 frees and regathers Blocks at new addresses while the first step's saved-tensor
    # hooks measure activations: weights must still be told apart from activations
    (["parallel.dp=2", "parallel.zero=3"], 2),
], ids=lambda v: "-".join(x.split(".")[-1] for x in v) if isinstance(v, list) else str(v))
def test_layout_matches_single_process(reference, layout, world, tmp_path, dist_pools):
    got = dist_pools.run(world, train, make_cfg(tmp_path, "run", *layout, *STEPS))[0][1]
    assert got == pytest.approx(reference, rel=1e-4)


def test_tp_checkpoint_resumes_without_tp(reference, tmp_path, dist_pools):
    dist_pools.run(4, train, make_cfg(tmp_path, "x", "parallel.tp_col=2", "parallel.pp=2",
                                      "parallel.micro_batch_size=2", "train.steps=2", "optim.grad_clip=0.5",
                                      "model.n_layers=4", "checkpoint.at_end=true"))
    start, rest = dist_pools.run(2, train, make_cfg(tmp_path, "x", "parallel.dp=2", *STEPS))[0]
    assert start == 2
    assert rest == pytest.approx(reference[2:], rel=1e-4)


def test_cp_checkpoint_resumes_at_cp1(reference, tmp_path, dist_pools):
    dist_pools.run(2, train, make_cfg(tmp_path, "c", "parallel.cp=2", "parallel.micro_batch_size=2",
                                      "train.steps=2", "optim.grad_clip=0.5", "model.n_layers=4",
                                      "checkpoint.at_end=true"))
    start, rest = dist_pools.run(1, train, make_cfg(tmp_path, "c", *STEPS))[0]
    assert start == 2
    assert rest == pytest.approx(reference[2:], rel=1e-4)
