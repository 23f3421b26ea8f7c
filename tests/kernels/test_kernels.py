"""Every Triton kernel against its PyTorch reference, forward and backward, fp32 and bf16, on
awkward sizes (widths that are not powers of two, odd row counts, GQA head counts), run under
Triton's interpreter on CPU (tests/conftest.py). Tolerances: fp32 1e-5 relative (the kernels
sum in a different order); bf16 one bf16 ulp of the output scale (2^-7 relative). The
tensor-parallel split row of RMSNorm, for both paths: tests/kernels/test_torch_paths.py."""
from __future__ import annotations

import pytest
import torch

import kernels
from kernels.triton_support import available

pytestmark = pytest.mark.skipif(not available(), reason="Triton is not installed (pip install triton)")
TOL = {torch.float32: 1e-5, torch.bfloat16: 2 ** -7}


def close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    scale = want.float().abs().max().clamp_min(1.0)
    err = (got.float() - want.float()).abs().max() / scale
    assert err <= TOL[dtype] * 2, f"max error {err.item():.3g} relative to the output's scale"


def both(fn_triton, fn_ref, inputs: list[torch.Tensor], dtype: torch.dtype) -> None:
    """Forward and backward of the two implementations on copies of `inputs`, one random dy."""
    outs, grads = [], []
    for fn in (fn_triton, fn_ref):
        leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
        y = fn(*leaves)
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(y.dtype)
        y.backward(dy)
        outs.append(y)
        grads.append([t.grad for t in leaves if t.requires_grad])
    close(outs[0], outs[1], dtype)
    for g_triton, g_ref in zip(*grads):
        close(g_triton, g_ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 5, 100), (1, 7, 48), (2, 130)])
def test_rms_norm(shape, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(dtype)
    w = (1 + 0.1 * torch.randn(shape[-1], generator=g)).to(dtype)
    both(lambda x, w: kernels.rms_norm(x, w, 1e-5, "triton"), lambda x, w: kernels.rms_norm(x, w, 1e-5, "torch"),
         [x, w], dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 7, 3, 24), (1, 5, 4, 10)])
def test_rope(shape, dtype):
    g = torch.Generator().manual_seed(2)
    B, S, H, hd = shape
    x = torch.randn(shape, generator=g).to(dtype)
    ang = torch.arange(S)[:, None] * torch.rand(hd // 2, generator=g)[None]  # [S, hd/2]
    cos, sin = ang.cos(), ang.sin()
    both(lambda x: kernels.rope(x, cos, sin, "triton"), lambda x: kernels.rope(x, cos, sin, "torch"), [x], dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 5, 344), (2, 1111)])
def test_swiglu(shape, dtype):
    g = torch.Generator().manual_seed(4)
    gate, up = (3 * torch.randn(shape, generator=g)).to(dtype), torch.randn(shape, generator=g).to(dtype)
    both(lambda a, b: kernels.swiglu(a, b, "triton"), lambda a, b: kernels.swiglu(a, b, "torch"), [gate, up], dtype)


def test_auto_uses_the_reference_on_cpu():
    x = torch.randn(2, 8)
    assert not kernels.use_triton("auto", x) and kernels.use_triton("triton", x)
