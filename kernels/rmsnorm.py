"""RMSNorm: Triton forward/backward, its autograd.Function and the PyTorch reference, with the
statistics optionally summed over a tensor-parallel group (the norm of a [.., d/tp_row] shard).

    y = rms_norm(x, weight, eps)                                     # x [.., d], weight [d]
    y = rms_norm(x, weight, eps, width=d, sum_across=f)              # x [.., d/t]: f all-reduces
                                                                     # a [rows, 1] fp32 partial sum

y = (x * rstd).to(x.dtype) * weight with rstd = 1 / sqrt(sum(x^2) / width + eps) over the full
width. The backward needs one more row sum over the full width: dx = rstd * (w dy - xhat *
sum(w dy xhat) / width), xhat = x * rstd; dw = sum over rows of dy * xhat. Each row sum is a
kernel, then `sum_across` (an all-reduce of [rows] fp32, differentiable in the reference path),
then the kernel that uses it, so one code path serves 1 and t ranks.

Both autograd.Functions (Triton, and the torch path `rms_norm_torch`, which runs the reference's
forward) save only the input x and rstd [.., 1] fp32, and rebuild xhat in backward; autograd
through the reference would also keep the fp32 xhat (docs/activation_memory.md).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from kernels.triton_support import triton, tl, block_for, launch_rows

SumAcross = Callable[[torch.Tensor], torch.Tensor]  # [rows, 1] fp32 partial -> the group's sum
ROWS_PER_PROGRAM = 16  # rows per program (a [ROWS, width] tile); the backward writes one dw partial each


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, width: Optional[int] = None,
                       sum_across: Optional[SumAcross] = None) -> torch.Tensor:
    """The PyTorch definition: x [.., n] (n = width / t under tensor parallelism), weight [n]."""
    xf = x.float()
    return (xf * _rstd(xf, eps, width, sum_across)).to(x.dtype) * weight


def _rstd(xf: torch.Tensor, eps: float, width: Optional[int], sum_across: Optional[SumAcross]) -> torch.Tensor:
    """1 / rms of each row of xf [.., n] fp32 over the whole width -> [.., 1] fp32."""
    if sum_across is None:
        return torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    total = sum_across(xf.pow(2).sum(-1, keepdim=True))  # [.., 1] over the whole width
    return torch.rsqrt(total / width + eps)


class RMSNormTorch(torch.autograd.Function):
    """The PyTorch path: the reference's forward; saves x and rstd [.., 1] fp32 only."""

    @staticmethod
    def forward(ctx, x, weight, eps, width, sum_across):
        xf = x.float()  # [.., n]
        rstd = _rstd(xf, eps, width, sum_across)  # [.., 1]
        ctx.save_for_backward(x, weight, rstd)
        ctx.width, ctx.sum_across = (x.shape[-1] if sum_across is None else width), sum_across
        return (xf * rstd).to(x.dtype) * weight

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        xhat = x.float() * rstd  # [.., n] fp32, rebuilt
        g = (dy * weight).float()  # d xhat
        dot = (g * xhat).sum(-1, keepdim=True)  # [.., 1] over this rank's columns
        if ctx.sum_across is not None:
            dot = ctx.sum_across(dot)
        dx = rstd * (g - xhat * dot / ctx.width)
        dw = (dy * xhat.to(x.dtype)).to(weight.dtype).sum_to_size(weight.shape)  # [n]
        return dx.to(x.dtype), dw, None, None, None


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float, width: Optional[int] = None,
                   sum_across: Optional[SumAcross] = None) -> torch.Tensor:
    return RMSNormTorch.apply(x, weight, eps, width, sum_across)


if triton is not None:
    @triton.jit
    def _row_sumsq(X, OUT, rows, n, ROWS: tl.constexpr, BLOCK: tl.constexpr):
        r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # [ROWS] rows of this program
        cols = tl.arange(0, BLOCK)
        mask = (r[:, None] < rows) & (cols[None, :] < n)
        x = tl.load(X + r[:, None] * n + cols[None, :], mask=mask, other=0.0).to(tl.float32)  # [ROWS, BLOCK]
        tl.store(OUT + r, tl.sum(x * x, axis=1), mask=r < rows)

    @triton.jit
    def _forward(X, W, SUMSQ, Y, RSTD, rows, n, width, eps, ROWS: tl.constexpr, BLOCK: tl.constexpr):
        r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK)
        mask = (r[:, None] < rows) & (cols[None, :] < n)
        x = tl.load(X + r[:, None] * n + cols[None, :], mask=mask, other=0.0)  # [ROWS, BLOCK]
        w = tl.load(W + cols, mask=cols < n, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.load(SUMSQ + r, mask=r < rows, other=0.0) / width + eps)  # [ROWS]
        xhat = (x.to(tl.float32) * rstd[:, None]).to(x.dtype).to(tl.float32)  # rounded as the reference
        tl.store(Y + r[:, None] * n + cols[None, :], (xhat * w[None, :]).to(Y.dtype.element_ty), mask=mask)
        tl.store(RSTD + r, rstd, mask=r < rows)

    @triton.jit
    def _row_dot(DY, X, W, RSTD, OUT, rows, n, ROWS: tl.constexpr, BLOCK: tl.constexpr):
        r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK)
        mask = (r[:, None] < rows) & (cols[None, :] < n)
        dy = tl.load(DY + r[:, None] * n + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        x = tl.load(X + r[:, None] * n + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        w = tl.load(W + cols, mask=cols < n, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + r, mask=r < rows, other=0.0)
        tl.store(OUT + r, tl.sum(dy * w[None, :] * x, axis=1) * rstd, mask=r < rows)

    @triton.jit
    def _backward(DY, X, W, RSTD, DOT, DX, DW_PART, rows, n, width, ROWS: tl.constexpr, BLOCK: tl.constexpr):
        prog = tl.program_id(0)
        r = prog * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK)
        mask = (r[:, None] < rows) & (cols[None, :] < n)
        offs = r[:, None] * n + cols[None, :]
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)  # [ROWS, BLOCK]
        w = tl.load(W + cols, mask=cols < n, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + r, mask=r < rows, other=0.0)
        xhat = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32) * rstd[:, None]
        dot = tl.load(DOT + r, mask=r < rows, other=0.0)
        dx = rstd[:, None] * (w[None, :] * dy - xhat * dot[:, None] / width)
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
        tl.store(DW_PART + prog * n + cols, tl.sum(dy * xhat, axis=0), mask=cols < n)


def _summed(partial: torch.Tensor, sum_across: Optional[SumAcross]) -> torch.Tensor:
    """[rows] fp32 partial sums over this rank's columns -> sums over the whole width."""
    return partial if sum_across is None else sum_across(partial[:, None])[:, 0]


class RMSNormFn(torch.autograd.Function):
    """The Triton RMSNorm (see the module docstring); saves x, weight and rstd [rows]."""

    @staticmethod
    def forward(ctx, x, weight, eps, width, sum_across):
        n = x.shape[-1]
        x2 = x.reshape(-1, n).contiguous()  # [rows, n]
        rows, block = x2.shape[0], block_for(n)
        programs = triton.cdiv(rows, ROWS_PER_PROGRAM)
        sumsq = torch.empty(rows, device=x.device, dtype=torch.float32)
        launch_rows(_row_sumsq, programs, x2, sumsq, rows, n, ROWS=ROWS_PER_PROGRAM, BLOCK=block)
        sumsq = _summed(sumsq, sum_across)
        y = torch.empty(x2.shape, device=x.device, dtype=torch.promote_types(x.dtype, weight.dtype))
        rstd = torch.empty_like(sumsq)
        launch_rows(_forward, programs, x2, weight, sumsq, y, rstd, rows, n, width, eps, ROWS=ROWS_PER_PROGRAM,
                    BLOCK=block)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.width, ctx.sum_across, ctx.x_shape, ctx.x_dtype = width, sum_across, x.shape, x.dtype
        return y.view(*x.shape[:-1], n)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        rows, n = x2.shape
        block = block_for(n)
        dy2 = dy.reshape(rows, n).contiguous()  # [rows, n]
        programs = triton.cdiv(rows, ROWS_PER_PROGRAM)
        dot = torch.empty(rows, device=dy.device, dtype=torch.float32)
        launch_rows(_row_dot, programs, dy2, x2, weight, rstd, dot, rows, n, ROWS=ROWS_PER_PROGRAM, BLOCK=block)
        dot = _summed(dot, ctx.sum_across)
        dx = torch.empty(rows, n, device=dy.device, dtype=ctx.x_dtype)
        dw_part = torch.empty(programs, n, device=dy.device, dtype=torch.float32)  # [programs, n]
        launch_rows(_backward, programs, dy2, x2, weight, rstd, dot, dx, dw_part, rows, n, ctx.width,
                    ROWS=ROWS_PER_PROGRAM, BLOCK=block)
        return dx.view(ctx.x_shape), dw_part.sum(0).to(weight.dtype), None, None, None


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float, width: Optional[int] = None,
                    sum_across: Optional[SumAcross] = None) -> torch.Tensor:
    return RMSNormFn.apply(x, weight, eps, width or x.shape[-1], sum_across)
