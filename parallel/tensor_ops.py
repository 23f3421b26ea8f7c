"""Autograd collectives on one grid axis used by the tensor-parallel layers: sums of partial
results (forward all-reduce; backward all-reduce or identity, by whether the consumers are split
or replicated over the axis) and the vocab-parallel cross-entropy, which never gathers logits.
"""
from __future__ import annotations

import torch

from parallel.loss_mask import kept


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


class VocabCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, comm, axis, v0):
        """Sum over tokens of the cross-entropy of logits [B, S, V/n] (this rank's vocabulary
        columns from v0) against global targets [B, S]; the same value on every rank of `axis`.
        Targets equal to IGNORE_INDEX (parallel/loss_mask.py) count for nothing."""
        lf = logits.float()  # [B, S, V/n]
        valid = kept(targets)  # [B, S]
        top = lf.max(-1).values  # [B, S]
        comm.all_reduce(top, axis, op="max")
        z = lf - top[..., None]
        e = z.exp()
        local = targets - v0
        inside = (local >= 0) & (local < lf.shape[-1])
        idx = local.clamp(0, lf.shape[-1] - 1)[..., None]  # [B, S, 1]
        stats = torch.stack((e.sum(-1), z.gather(-1, idx)[..., 0] * inside))  # [2, B, S]
        comm.all_reduce(stats, axis)
        ctx.save_for_backward(e, stats[0], idx, inside, valid)
        ctx.dtype = logits.dtype
        return ((stats[0].log() - stats[1]) * valid).sum()

    @staticmethod
    def backward(ctx, g):
        e, total, idx, inside, valid = ctx.saved_tensors
        p = e / total[..., None]  # softmax over the whole vocabulary, this rank's columns
        p.scatter_add_(-1, idx, -inside[..., None].to(p.dtype))
        p.mul_(valid[..., None])  # an ignored target has no gradient
        return (p * g).to(ctx.dtype), None, None, None, None
