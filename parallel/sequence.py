"""Sequence parallelism (Megatron-SP) on the tensor-parallel column axis.

With `plan.sequence_parallel`, the residual stream (norms, residual adds, dropout regions) is
split along the sequence over `tp_col` instead of being replicated there. Entering a
tensor-parallel region all-gathers the sequence (backward: reduce-scatter, which also sums the
input gradients the column-split weights produce); leaving it reduce-scatters the partial
outputs (backward: all-gather). Each all-reduce of the plain layout thus becomes one
reduce-scatter plus one all-gather of the same total volume. Tensors are [B, S, h]; the
sequence is dim 1.
"""
from __future__ import annotations

import torch

from parallel.collectives import Collectives

SEQ_DIM = 1


class _GatherSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: Collectives, axis: str) -> torch.Tensor:
        ctx.comm, ctx.axis = comm, axis
        return comm.gather_along(x, axis, SEQ_DIM)  # [B, S/n, h] -> [B, S, h]

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        return ctx.comm.scatter_along(dy, ctx.axis, SEQ_DIM), None, None  # [B, S, h] -> [B, S/n, h]


class _ScatterSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, comm: Collectives, axis: str) -> torch.Tensor:
        ctx.comm, ctx.axis = comm, axis
        return comm.scatter_along(x, axis, SEQ_DIM)  # partial [B, S, h] -> summed [B, S/n, h]

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        return ctx.comm.gather_along(dy, ctx.axis, SEQ_DIM), None, None  # [B, S/n, h] -> [B, S, h]


def gather_seq(x: torch.Tensor, comm: Collectives, axis: str) -> torch.Tensor:
    """Sequence-sharded [B, S/n, h] -> whole sequence [B, S, h] (enter a tensor-parallel region)."""
    return _GatherSeq.apply(x, comm, axis)


def scatter_seq(x: torch.Tensor, comm: Collectives, axis: str) -> torch.Tensor:
    """Partial sums [B, S, h] -> summed, sequence-sharded [B, S/n, h] (leave the region)."""
    return _ScatterSeq.apply(x, comm, axis)


def local_positions(positions: torch.Tensor, comm: Collectives, axis: str) -> torch.Tensor:
    """This rank's chunk of the sequence positions [S] -> [S/n]."""
    return positions.chunk(comm.size(axis))[comm.coord(axis)]
