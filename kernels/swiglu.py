"""SwiGLU: silu(gate) * up, Triton forward/backward, the PyTorch reference, and one
autograd.Function per path (Triton, torch). Both backwards recompute silu from the saved inputs
(gate, up [.., d_ff]): nothing of the forward's is kept but its two inputs, where autograd
through the reference also keeps silu(gate) (docs/activation_memory.md).

    y = silu(g) * u;  dg = dy * u * s * (1 + g (1 - s)),  du = dy * silu(g),  s = sigmoid(g)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.triton_support import triton, tl

BLOCK = 1024  # elements per program


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The PyTorch definition: gate, up [.., d_ff] -> [.., d_ff]."""
    return F.silu(gate) * up


def swiglu_grads(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(d gate, d up) [.., d_ff] of the reference, silu recomputed; rounded as autograd rounds the
    reference's backward (dy * up in the inputs' dtype, silu's derivative in fp32)."""
    g = gate.float()
    s = torch.sigmoid(g)
    d_silu = (dy * up).float()  # [.., d_ff]
    return (d_silu * s * (1 + g * (1 - s))).to(gate.dtype), (dy * F.silu(gate)).to(up.dtype)


class SwiGLUTorch(torch.autograd.Function):
    """The PyTorch path: the reference's forward, a backward from the saved gate and up only."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return swiglu_reference(gate, up)

    @staticmethod
    def backward(ctx, dy):
        return swiglu_grads(dy, *ctx.saved_tensors)


def swiglu_torch(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return SwiGLUTorch.apply(gate, up)


if triton is not None:
    @triton.jit
    def _forward(G, U, Y, total, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < total
        g = tl.load(G + offs, mask=mask, other=0.0)
        u = tl.load(U + offs, mask=mask, other=0.0)
        gf = g.to(tl.float32)
        silu = (gf * tl.sigmoid(gf)).to(g.dtype)  # rounded as F.silu is in its dtype
        tl.store(Y + offs, (silu.to(tl.float32) * u.to(tl.float32)).to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _backward(DY, G, U, DG, DU, total, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < total
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
        s = tl.sigmoid(g)
        tl.store(DG + offs, (dy * u * s * (1.0 + g * (1.0 - s))).to(DG.dtype.element_ty), mask=mask)
        tl.store(DU + offs, (dy * g * s).to(DU.dtype.element_ty), mask=mask)


class SwiGLUFn(torch.autograd.Function):
    """The Triton SwiGLU (see the module docstring); saves gate and up."""

    @staticmethod
    def forward(ctx, gate, up):
        g, u = gate.contiguous(), up.contiguous()
        y = torch.empty(g.shape, device=g.device, dtype=torch.promote_types(g.dtype, u.dtype))
        total = g.numel()
        _forward[(triton.cdiv(total, BLOCK),)](g, u, y, total, BLOCK=BLOCK)
        ctx.save_for_backward(g, u)
        return y

    @staticmethod
    def backward(ctx, dy):
        g, u = ctx.saved_tensors
        dg, du = torch.empty_like(g), torch.empty_like(u)
        total = g.numel()
        _backward[(triton.cdiv(total, BLOCK),)](dy.contiguous(), g, u, dg, du, total, BLOCK=BLOCK)
        return dg, du


def swiglu_triton(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return SwiGLUFn.apply(gate, up)
