"""The loss at the end of the last pipeline chunk: hidden states to the summed token loss.

    loss_fn = choose(spec, plan, tp)         # parallelize's choice (tp: TensorParallel or None)
    loss_sum = loss_fn(chunk, x, targets)    # last chunk, hidden [b, S(/tp_col), h], targets [b, S] -> fp32 scalar

The executor (parallel/executor.py) calls it where the chunk's head would run, under the step's
autocast. `choose` picks per microbatch by perfmodel/memory.py's `fused_head_loss(spec, plan,
tokens)` (the same rule prices the head's memory), tokens the count of its targets:
- `fused`: an unsplit head (no tensor parallelism). The final norm, the head matmul and the
  cross-entropy fused by token chunks (GPT.head_loss, kernels/linear_ce.py): the [b, S, V] logits
  never exist whole; the head's weight gradient is computed in the same pass as the input
  gradient, so a split-backward schedule computes it in B (parallel/executor.py).
- `fused_vocab_parallel`: the same under 1D tensor parallelism (tp_row = tp_depth = 1), the head's
  vocabulary rows split over tp_col (parallel/tensor.py `TPLinear.fused_loss`).
- `of_logits(loss_fn)`: the head's logits (this rank's vocabulary columns under tensor
  parallelism) and `loss_fn(logits, targets)` on them, outside autocast: kernels.cross_entropy
  (vocab-parallel under tensor parallelism: `TensorParallel.loss_fn`), or `cross_entropy_sum`
  where a caller wants the unfused definition (the peers' benchmarks, the tests' references).
Targets equal to IGNORE_INDEX (parallel/loss_mask.py) count for nothing in all of them.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from parallel.loss_mask import IGNORE_INDEX
from perfmodel.memory import fused_head_loss
from perfmodel.specs import ModelSpec, Plan

if TYPE_CHECKING:
    from parallel.tensor import TensorParallel

HeadLoss = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]  # (last chunk, hidden, targets) -> sum
LogitsLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, targets) -> sum


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum of token cross-entropies: logits [B, S, V], targets [B, S] (no vocabulary split)."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum",
                           ignore_index=IGNORE_INDEX)


def fused(chunk: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """hidden x [b, S, h] -> the summed loss of the chunk's unsplit head, fused (GPT.head_loss)."""
    return chunk.head_loss(x, targets)


def fused_vocab_parallel(chunk: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """hidden x [b, S(/tp_col under SP), h] -> the summed loss of the chunk's 1D tensor-parallel
    head, fused: GPT.head_loss's final norm, then the head's vocab-parallel fused loss."""
    return chunk.head.fused_loss(chunk.norm(x), targets)


def of_logits(loss_fn: LogitsLoss) -> HeadLoss:
    """The head loss that computes the chunk's logits [b, S, V or V/tp] and `loss_fn` on them, outside autocast."""
    def head_loss(chunk: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = chunk.logits(x)  # [b, S, V], under the caller's autocast
        with torch.autocast(x.device.type, enabled=False):
            return loss_fn(logits, targets)
    return head_loss


def choose(spec: ModelSpec, plan: Plan, tp: Optional["TensorParallel"]) -> HeadLoss:
    """The trainer's head loss: per microbatch fused where `fused_head_loss` says it pays, else
    the chunked cross-entropy of the logits (vocab-parallel under tensor parallelism)."""
    if tp is None:
        fused_fn = fused
        unfused = of_logits(lambda logits, targets: kernels.cross_entropy(logits, targets, spec.d_model,
                                                                          spec.kernels))
    else:
        fused_fn, unfused = fused_vocab_parallel, of_logits(tp.loss_fn)

    def head_loss(chunk: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if fused_head_loss(spec, plan, targets.numel()):
            return fused_fn(chunk, x, targets)
        return unfused(chunk, x, targets)
    return head_loss
