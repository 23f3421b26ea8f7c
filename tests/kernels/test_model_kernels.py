"""Whole-model parity with the kernels on (model.kernels=triton, under Triton's interpreter on
CPU) and off (torch): logits and gradients of one process, and the trainer's losses under
tensor parallelism (tp_row: the norm's statistics summed over tp_row) and ring context
parallelism. Tolerance: fp32, 1e-5 relative for a forward/backward, 1e-4 after AdamW steps (as
tests/distributed/test_trainer_4d.py)."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from axon.init import materialize
from axon.model import build
from kernels.triton_support import available
from perfmodel.specs import ModelSpec
from tests.distributed.trainer_driver import make_cfg, train

pytestmark = pytest.mark.skipif(not available(), reason="Triton is not installed (pip install triton)")
# two AdamW steps of a small model with clipping active (the interpreter runs each kernel program in numpy,
# its time about proportional to the tokens: a global batch of 2 samples, two microbatches a step on each rank)
STEPS = ["train.steps=2", "optim.grad_clip=0.5", "model.n_layers=2", "model.d_model=64", "model.d_ff=128",
         "train.seq_len=16", "train.global_batch_size=2"]
SPEC = ModelSpec(n_layers=2, d_model=48, n_heads=4, n_kv_heads=2, d_ff=100, vocab_size=96, max_seq_len=64)


def run(kind: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    spec = replace(SPEC, kernels=kind)
    model = build(spec)
    materialize(model, spec, seed=5, device=torch.device("cpu"))
    tokens = torch.randint(0, spec.vocab_size, (2, 17), generator=torch.Generator().manual_seed(6))
    logits = model(tokens[:, :-1])  # [2, 16, V]
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters()}


def test_one_process_logits_and_gradients():
    (lt, gt), (lr, gr) = run("triton"), run("torch")
    assert torch.allclose(lt, lr, rtol=1e-5, atol=1e-5)
    for name in gr:
        assert torch.allclose(gt[name], gr[name], rtol=1e-4, atol=1e-6), name


@pytest.mark.parametrize("layout,world", [(["parallel.tp_row=2"], 2), (["parallel.cp=2", "parallel.cp_mode=ring"], 2)],
                         ids=["tp_row2", "cp2-ring"])
def test_trainer_losses_with_kernels_on_and_off(layout, world, tmp_path, dist_pools):
    losses = [dist_pools.run(world, train, make_cfg(tmp_path, kind, *layout, *STEPS, f"model.kernels={kind}"))[0][1]
              for kind in ("torch", "triton")]
    assert len(losses[0]) == 2
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)
