"""Rotary position embedding (interleaved pairs, as in Meta's Llama): Triton forward/backward,
its autograd.Function and the PyTorch reference. The angle tables (cos, sin [S, hd/2], Llama 3.1
frequency scaling included) come from `axon.model.rope_tables`; the kernel rotates each pair
(x0, x1) of a head by its position's angle, and the backward rotates the gradient back (the
same kernel with -sin). Positions are global, so a context-parallel shard passes its own rows.

    out0 = x0 cos - x1 sin,  out1 = x0 sin + x1 cos        x [B, S, H, hd]
"""
from __future__ import annotations

import torch

from kernels.triton_support import triton, tl, block_for, launch_rows


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The PyTorch definition: x [B, S, H, hd], cos/sin [S, hd/2] -> [B, S, H, hd]."""
    xf = x.float().reshape(*x.shape[:-1], -1, 2)  # [B, S, H, hd/2, 2]
    x0, x1 = xf[..., 0], xf[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    out = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1)
    return out.flatten(-2).to(x.dtype)


ROWS_PER_PROGRAM = 16  # head vectors per program (a [ROWS, hd/2] tile of pairs)

if triton is not None:
    @triton.jit
    def _rotate(X, COS, SIN, Y, rows, S, H, half, sign, ROWS: tl.constexpr, BLOCK: tl.constexpr):
        r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # [ROWS] (b, s, h) head vectors
        pos = (r // H) % S
        k = tl.arange(0, BLOCK)
        mask = (r[:, None] < rows) & (k[None, :] < half)
        even = r[:, None] * 2 * half + 2 * k[None, :]  # [ROWS, BLOCK] offsets of x0
        angle = pos[:, None] * half + k[None, :]
        x0 = tl.load(X + even, mask=mask, other=0.0).to(tl.float32)
        x1 = tl.load(X + even + 1, mask=mask, other=0.0).to(tl.float32)
        c = tl.load(COS + angle, mask=mask, other=0.0)
        s = sign * tl.load(SIN + angle, mask=mask, other=0.0)
        tl.store(Y + even, (x0 * c - x1 * s).to(Y.dtype.element_ty), mask=mask)
        tl.store(Y + even + 1, (x0 * s + x1 * c).to(Y.dtype.element_ty), mask=mask)


def _launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> torch.Tensor:
    B, S, H, hd = x.shape
    x = x.contiguous()
    y = torch.empty_like(x)
    rows = B * S * H
    launch_rows(_rotate, triton.cdiv(rows, ROWS_PER_PROGRAM), x, cos.float().contiguous(), sin.float().contiguous(),
                y, rows, S, H, hd // 2, sign, ROWS=ROWS_PER_PROGRAM, BLOCK=block_for(hd // 2))
    return y


class RoPEFn(torch.autograd.Function):
    """The Triton RoPE (see the module docstring); saves only the angle tables."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _launch(x, cos, sin, 1.0)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return _launch(dy, cos, sin, -1.0), None, None


def rope_triton(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return RoPEFn.apply(x, cos, sin)
