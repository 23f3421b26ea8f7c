"""Autograd collectives on one grid axis used by the tensor-parallel layers: sums of partial
results (forward all-reduce; backward all-reduce or identity, by whether the consumers are split
or replicated over the axis), a replicated input read by split consumers (forward identity,
backward all-reduce), and the in-place all-reduce kernels' vocabulary split takes (`reducer`).
"""
from __future__ import annotations

from typing import Callable

import torch

from parallel.collectives import Collectives


class SumAcross(torch.autograd.Function):
    """Forward all-reduce; backward all-reduce (the consumers are split over the axis)."""

    @staticmethod
    def forward(ctx, x, comm, axis):
        ctx.comm, ctx.axis = comm, axis
        out = x.clone()
        comm.all_reduce(out, axis)
        return out

    @staticmethod
    def backward(ctx, dy):
        dx = dy.clone()
        ctx.comm.all_reduce(dx, ctx.axis)
        return dx, None, None


class ReduceFrom(torch.autograd.Function):
    """Forward all-reduce of partial sums; backward identity (the consumers are replicated)."""

    @staticmethod
    def forward(ctx, x, comm, axis):
        out = x.clone()
        comm.all_reduce(out, axis)
        return out

    @staticmethod
    def backward(ctx, dy):
        return dy, None, None


class CopyTo(torch.autograd.Function):
    """Forward identity; backward all-reduce: an input replicated over the axis whose consumers are
    split over it (their input gradients are partial sums), as Megatron's copy to the region."""

    @staticmethod
    def forward(ctx, x, comm, axis):
        ctx.comm, ctx.axis = comm, axis
        return x.view_as(x)

    @staticmethod
    def backward(ctx, dy):
        dx = dy.clone()
        ctx.comm.all_reduce(dx, ctx.axis)
        return dx, None, None


def reducer(comm: Collectives, axis: str) -> Callable[[torch.Tensor, str], None]:
    """The `vocab_reduce` of kernels' cross-entropies: t all-reduced in place over `axis` ("max" | "sum")."""
    def reduce(t: torch.Tensor, op: str) -> None:
        comm.all_reduce(t, axis, op=op)
    return reduce
