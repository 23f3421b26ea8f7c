"""Cross-entropy of given logits, by token chunks with the fused loss's per-chunk math
(kernels/linear_ce.py), optionally over a vocabulary split (issue 16: one cross-entropy).

    loss = cross_entropy(logits, targets, width)   # logits [.., v], targets [..] -> fp32 sum over kept targets

For the heads whose logits exist whole: a head split over tp_row or tp_depth (parallel/tensor.py
`TensorParallel.loss_fn`), and a head too small for the fused loss to pay (perfmodel/memory.py
`fused_head_loss`). The forward keeps the logits (saved by reference, no copy) and the fp32
log-sum-exp per token; the backward writes the gradient chunk by chunk into one [N, v] tensor of
the logits' dtype. Per chunk the statistics and the gradient come from linear_ce's
`chunk_stats_*` / `chunk_grad_*` (torch ops, or the Triton kernels for a whole vocabulary), so
the fp32 temporaries are one chunk's [C, v], never the whole logits'. The chunk is the fused
loss's (`loss_chunk_tokens(tokens, width, v)`, width the head's input width), so the two paths
hold the same working set beyond the logits (perfmodel/memory.py `logits_bytes`).

Vocabulary split (`vocab_start`, `vocab_reduce`): as linear_ce's; logits are this rank's columns
from vocab_start, targets global ids, and the value is the same on every rank of the group.
"""
from __future__ import annotations

from typing import Optional

import torch

from kernels.linear_ce import (VocabReduce, chunk_grad_torch, chunk_grad_triton, chunk_stats_torch,
                               chunk_stats_triton)
from perfmodel.memory import loss_chunk_tokens


def _stats(rows: torch.Tensor, targets: torch.Tensor, use_triton: bool, vocab_start: int,
           vocab_reduce: Optional[VocabReduce]) -> tuple[torch.Tensor, torch.Tensor]:
    """(lse [C], loss [C]) of one chunk of logits rows [C, v], left unchanged."""
    if use_triton:
        return chunk_stats_triton(rows, targets)
    scratch = rows.clone() if rows.dtype == torch.float32 else rows  # chunk_stats_torch overwrites fp32 logits
    return chunk_stats_torch(scratch, targets, vocab_start, vocab_reduce)


class CrossEntropyFn(torch.autograd.Function):
    """The chunked cross-entropy (see the module docstring): saves the logits and lse [N] fp32."""

    @staticmethod
    def forward(ctx, logits, targets, chunk, use_triton, vocab_start, vocab_reduce):
        rows, t = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)  # [N, v], [N]
        lse = torch.empty(t.shape[0], device=logits.device, dtype=torch.float32)  # [N]
        total = torch.zeros((), device=logits.device, dtype=torch.float32)
        for i in range(0, t.shape[0], chunk):
            lse[i:i + chunk], loss = _stats(rows[i:i + chunk], t[i:i + chunk], use_triton, vocab_start, vocab_reduce)
            total += loss.sum()
        ctx.save_for_backward(logits, targets, lse)
        ctx.chunk, ctx.use_triton, ctx.vocab_start = chunk, use_triton, vocab_start
        return total

    @staticmethod
    def backward(ctx, g):
        logits, targets, lse = ctx.saved_tensors
        rows, t = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
        grad = rows.clone()  # [N, v]: each chunk's logits, overwritten by their gradient
        for i in range(0, t.shape[0], ctx.chunk):
            part = grad[i:i + ctx.chunk]  # [C, v], contiguous rows
            if ctx.use_triton:
                chunk_grad_triton(part, t[i:i + ctx.chunk], lse[i:i + ctx.chunk], g)
                continue
            d = chunk_grad_torch(part, t[i:i + ctx.chunk], lse[i:i + ctx.chunk], g, ctx.vocab_start)
            if d.data_ptr() != part.data_ptr():  # lower-precision logits: computed in an fp32 copy
                part.copy_(d)
        return grad.view_as(logits), None, None, None, None, None


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, width: int, use_triton: bool = False,
                  chunk: Optional[int] = None, vocab_start: int = 0,
                  vocab_reduce: Optional[VocabReduce] = None) -> torch.Tensor:
    """logits [.., v] (v = V, or this rank's V/n columns from vocab_start under `vocab_reduce`),
    targets [..] global ids -> fp32 sum of the cross-entropy over kept targets (a negative target
    counts for nothing), by chunks of `chunk` tokens (default: the fused loss's for a head input
    `width` wide). Runs outside autocast (the statistics are fp32 whatever the logits' dtype)."""
    if use_triton and vocab_reduce is not None:
        raise NotImplementedError("the Triton chunk kernels take a whole vocabulary; use the torch path")
    n = targets.numel()
    chunk = chunk or loss_chunk_tokens(n, width, logits.shape[-1])
    with torch.autocast(logits.device.type, enabled=False):
        return CrossEntropyFn.apply(logits.contiguous(), targets.contiguous(), chunk, use_triton, vocab_start,
                                    vocab_reduce)
