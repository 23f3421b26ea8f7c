"""Flash attention (kernels/flash_attention.py, kernels/flash_kernels.py) under Triton's
interpreter on CPU: the Triton block kernels against the PyTorch reference (out, lse, dq, dk, dv),
the model's `kernels.attention` Triton path against the SDPA path, and ring attention on one rank
with either block math.

Sizes are awkward on purpose: sequence lengths that are not multiples of the 16-row tiles the
interpreter runs, head_dim 24 (padded to 32 by masking), GQA ratios 1, 2, 3, strided views (the
zig-zag halves), document masks with rows that see no key. Tolerances, relative to the largest
magnitude of the reference: fp32 1e-5 (the kernels sum in a different order); bf16 2^-6 (both
round P to bf16 before P V; the reference also rounds QK^T to bf16, the kernel keeps it fp32,
which moves a probability by up to about 2^-8 of itself)."""
from __future__ import annotations

import math

import pytest
import torch

import kernels
from kernels import flash_attention as fa
from kernels.triton_support import available
from parallel.ring_attention import Ring, RingAttention

pytestmark = pytest.mark.skipif(not available(), reason="Triton is not installed (pip install triton)")
TOL = {torch.float32: 1e-5, torch.bfloat16: 2 ** -6}
NEG = float("-inf")


def close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    scale = want.float().abs().max().clamp_min(1.0)
    err = (got.float() - want.float()).abs().max() / scale
    assert err <= TOL[dtype], f"{what}: max error {err.item():.3g} relative to the reference's scale"


def close_lse(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    """Equal -inf rows (no visible key), close finite ones."""
    assert torch.equal(got == NEG, want == NEG), "lse: rows without a visible key differ"
    seen = want != NEG
    close(got[seen], want[seen], dtype, "lse")


CASES = [  # dtype, B, Hkv, rep, Sq, Sk, hd, causal, packed
    (torch.float32, 1, 1, 3, 20, 20, 24, True, False),  # GQA 3, diagonal block, a ragged second tile
    (torch.float32, 2, 1, 2, 19, 37, 24, False, True),  # an off-diagonal block, documents, rows with no key
    (torch.bfloat16, 1, 2, 1, 18, 18, 24, True, True),
    (torch.bfloat16, 1, 1, 2, 17, 33, 16, False, False),
]


@pytest.mark.parametrize("dtype,B,Hkv,rep,Sq,Sk,hd,causal,packed", CASES)
def test_block_matches_reference(dtype, B, Hkv, rep, Sq, Sk, hd, causal, packed):
    g = torch.Generator().manual_seed(Sq)
    # strided views, as ring attention passes the zig-zag halves: rows 3.. of q, keys ..Sk of kv
    q = torch.randn(B, Hkv, rep, Sq + 3, hd, generator=g).to(dtype)[..., 3:, :]
    kv = torch.randn(2, B, Hkv, Sk + 5, hd, generator=g).to(dtype)[..., :Sk, :]
    qd = kd = None
    if packed:
        qd, kd = torch.randint(0, 3, (B, Sq), generator=g), torch.randint(0, 3, (B, Sk), generator=g)
        qd[:, :2] = 9  # a document none of these keys belongs to
    scale = 1 / math.sqrt(hd)
    out, lse = kernels.attention_block(q, kv, causal, scale, qd, kd, "triton")
    ref_out, ref_lse = kernels.attention_block(q, kv, causal, scale, qd, kd, "torch")
    close(out, ref_out, dtype, "out")
    close_lse(lse, ref_lse, dtype)
    if packed:
        assert (out[..., :2, :] == 0).all() and (lse[..., :2] == NEG).all()

    # the final lse of a row after merging another block, and delta = rowsum(dout * out) of the merge
    final = torch.logaddexp(ref_lse, torch.randn(ref_lse.shape, generator=g))
    dout = torch.randn(q.shape, generator=g).to(dtype)
    delta = torch.randn(ref_lse.shape, generator=g)
    dq, dkv = kernels.attention_block_backward(q, kv, dout, final, delta, causal, scale, qd, kd, "triton")
    ref_dq, ref_dkv = kernels.attention_block_backward(q, kv, dout, final, delta, causal, scale, qd, kd, "torch")
    close(dq, ref_dq, dtype, "dq")
    close(dkv[0], ref_dkv[0], dtype, "dk")
    close(dkv[1], ref_dkv[1], dtype, "dv")
    if packed:  # the block's own lse as the final one: -inf rows give zero gradients, no NaN
        dq, dkv = kernels.attention_block_backward(q, kv, dout, lse, delta, causal, scale, qd, kd, "triton")
        assert dq.isfinite().all() and dkv.isfinite().all() and (dq[..., :2, :] == 0).all()


def grads(fn, inputs: list[torch.Tensor], dout: torch.Tensor) -> list[torch.Tensor]:
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    y = fn(*leaves)
    y.backward(dout)
    return [y.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize("packed", [False, True])
def test_model_attention_triton_matches_sdpa(packed):
    """kernels.attention: q [B, S, Hq, hd], k/v [B, S, Hkv, hd], GQA 2, with and without packed rows."""
    g = torch.Generator().manual_seed(4)
    B, S, Hq, Hkv, hd = 2, 21, 4, 2, 24
    q = torch.randn(B, S, Hq, hd, generator=g)
    k, v = (torch.randn(B, S, Hkv, hd, generator=g) for _ in range(2))
    dout = torch.randn(B, S, Hq, hd, generator=g)
    positions = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in ([7, 1, 13], [21])]) if packed \
        else None  # [B, S]: documents of 7, 1 and 13 tokens in row 0, one document in row 1
    got = grads(lambda *t: kernels.attention(*t, positions, "triton"), [q, k, v], dout)
    want = grads(lambda *t: kernels.attention(*t, positions, "torch"), [q, k, v], dout)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        close(a, b, torch.float32, name)


def test_ring_attention_one_rank_triton_matches_torch():
    """RingAttention at cp=1 (block math, merge, backward) with kind=triton vs kind=torch, packed rows."""
    g = torch.Generator().manual_seed(5)
    B, S, Hq, Hkv, hd = 1, 22, 3, 1, 24
    q = torch.randn(B, S, Hq, hd, generator=g)
    k, v = (torch.randn(B, S, Hkv, hd, generator=g) for _ in range(2))
    dout = torch.randn(B, S, Hq, hd, generator=g)
    docs = torch.tensor([[0] * 9 + [9] * 13])  # [B, S] document starts
    ring = Ring(1, 0, (0,), None)
    got = grads(lambda *t: RingAttention.apply(*t, ring, docs, "triton"), [q, k, v], dout)
    want = grads(lambda *t: RingAttention.apply(*t, ring, docs, "torch"), [q, k, v], dout)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        close(a, b, torch.float32, name)


def test_flash_attention_saves_inputs_output_and_lse_only():
    """The Triton model path saves q, k, v, the output and lse fp32 [B, Hkv, rep, S]: no [S, S] tensor."""
    B, S, Hq, Hkv, hd = 1, 17, 4, 2, 16
    q = torch.randn(B, S, Hq, hd, requires_grad=True)
    k, v = (torch.randn(B, S, Hkv, hd, requires_grad=True) for _ in range(2))
    seen: list[tuple[int, ...]] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: seen.append(tuple(t.shape)) or t, lambda t: t):
        fa.attention_triton(q, k, v)
    assert sorted(seen) == sorted([(B, S, Hq, hd), (B, S, Hkv, hd), (B, S, Hkv, hd), (B, S, Hq, hd),
                                   (B, Hkv, Hq // Hkv, S)])
