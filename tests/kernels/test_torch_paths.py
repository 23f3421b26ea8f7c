"""The PyTorch paths of RMSNorm and SwiGLU (autograd.Functions that save only what their backward
needs) against autograd through their references: the forward bit for bit, the gradients within
rounding (fp32 1e-6 relative to the output's scale; bf16 one bf16 ulp, 2^-7), on awkward sizes,
with the tensor-parallel split row of RMSNorm (both paths); and what each saves for backward, Triton included.
Runs without Triton (the Triton checks skip)."""
from __future__ import annotations

import pytest
import torch

import kernels
from kernels.rmsnorm import rms_norm_reference
from kernels.swiglu import swiglu_reference
from kernels.triton_support import available

TOL = {torch.float32: 1e-6, torch.bfloat16: 2 ** -7}


def close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    scale = want.float().abs().max().clamp_min(1.0)
    err = (got.float() - want.float()).abs().max() / scale
    assert err <= TOL[dtype], f"max error {err.item():.3g} relative to the output's scale"


def against_reference(fn, ref, inputs: list[torch.Tensor], dtype: torch.dtype) -> None:
    outs, grads = [], []
    for f in (fn, ref):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        y = f(*leaves)
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(y.dtype))
        outs.append(y)
        grads.append([t.grad for t in leaves])
    assert torch.equal(outs[0], outs[1])
    for got, want in zip(*grads):
        assert got.dtype == want.dtype
        close(got, want, dtype)


def saved(fn, *inputs: torch.Tensor) -> list[tuple[tuple[int, ...], torch.dtype, int]]:
    """(shape, dtype, storage pointer) of each tensor fn saves for backward."""
    out = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        out.append((tuple(t.shape), t.dtype, t.untyped_storage().data_ptr()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*inputs)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 5, 100), (1, 7, 48), (2, 130)])
def test_rms_norm_torch_path(shape, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(dtype)
    w = (1 + 0.1 * torch.randn(shape[-1], generator=g)).to(dtype)
    against_reference(lambda x, w: kernels.rms_norm(x, w, 1e-5, "torch"), lambda x, w: rms_norm_reference(x, w, 1e-5),
                      [x, w], dtype)


TRITON = pytest.mark.skipif(not available(), reason="Triton is not installed (pip install triton)")
# (kind, rtol of the output, rtol and atol of the gradients): each path at the tolerance it meets
SPLIT_ROW = [("torch", 1e-6, 1e-5, 1e-6), pytest.param("triton", 1e-5, 1e-4, 1e-5, marks=TRITON)]


@pytest.mark.parametrize("kind,rtol_y,rtol_g,atol_g", SPLIT_ROW)
def test_rms_norm_with_statistics_over_a_split_row(kind, rtol_y, rtol_g, atol_g):
    """The tensor-parallel variant of either path: each half of a row, its row sums completed by
    `sum_across` (the other half's partial sum, as the tp_row all-reduce would give, in the forward
    and again in the backward), gives that half of the whole row's norm and gradients. (The
    reference's variant runs in the tensor-parallel parity tests.)"""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 90, generator=g).requires_grad_()
    w = (1 + 0.1 * torch.randn(90, generator=g)).requires_grad_()
    dy = torch.randn(6, 90, generator=g)
    rms_norm_reference(x, w, 1e-5).backward(dy)
    halves = (slice(0, 45), slice(45, 90))
    xd, wd = x.detach(), w.detach()
    rstd = torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-5)  # [6, 1]
    for h, other in zip(halves, reversed(halves)):
        forward_sum = xd[:, other].pow(2).sum(-1, keepdim=True)  # the other half's partial sums
        backward_dot = (dy[:, other] * wd[other] * xd[:, other] * rstd).sum(-1, keepdim=True)
        sums = iter((forward_sum, backward_dot))
        xk, wk = xd[:, h].clone().requires_grad_(), wd[h].clone().requires_grad_()
        y = kernels.rms_norm(xk, wk, 1e-5, kind, width=90, sum_across=lambda t: t + next(sums))
        y.backward(dy[:, h])
        assert torch.allclose(y, rms_norm_reference(xd, wd, 1e-5)[:, h], rtol=rtol_y, atol=1e-6)
        assert torch.allclose(xk.grad, x.grad[:, h], rtol=rtol_g, atol=atol_g)
        assert torch.allclose(wk.grad, w.grad[h], rtol=rtol_g, atol=atol_g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 5, 344), (2, 1111)])
def test_swiglu_torch_path(shape, dtype):
    g = torch.Generator().manual_seed(4)
    gate, up = (3 * torch.randn(shape, generator=g)).to(dtype), torch.randn(shape, generator=g).to(dtype)
    against_reference(lambda a, b: kernels.swiglu(a, b, "torch"), swiglu_reference, [gate, up], dtype)


@pytest.mark.parametrize("kind", ["torch", pytest.param("triton", marks=TRITON)])
def test_saved_for_backward(kind):
    """RMSNorm: its input and rstd (fp32, one per row; the weight is a parameter, not an
    activation); SwiGLU: its two inputs. Nothing else."""
    x = torch.randn(2, 5, 48, requires_grad=True)  # [B, S, h]
    w = torch.nn.Parameter(torch.ones(48))
    norm = saved(lambda x, w: kernels.rms_norm(x, w, 1e-5, kind), x, w)
    assert [(s, d) for s, d, p in norm if p not in (x.untyped_storage().data_ptr(), w.untyped_storage().data_ptr())] \
        in ([((2, 5, 1), torch.float32)], [((10,), torch.float32)])  # rstd [.., 1] (torch) or [rows] (Triton)
    assert {p for _, _, p in norm} >= {x.untyped_storage().data_ptr()} and len(norm) == 3
    gate, up = torch.randn(2, 5, 344, requires_grad=True), torch.randn(2, 5, 344, requires_grad=True)
    mlp = saved(lambda a, b: kernels.swiglu(a, b, kind), gate, up)
    assert sorted(p for _, _, p in mlp) == sorted((gate.untyped_storage().data_ptr(), up.untyped_storage().data_ptr()))
