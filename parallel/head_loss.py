"""The loss at the end of the last pipeline chunk: hidden states to the summed token loss.

    loss_sum = head_loss(chunk, x, targets)   # last chunk, hidden [b, S, h], targets [b, S] -> fp32 scalar

The executor (parallel/executor.py) calls it where the chunk's head would run, under the step's
autocast. Which one a chunk gets is `parallelize`'s choice, by perfmodel/memory.py's
`fused_head_loss(plan)` (the same rule prices the head's memory):
- `fused`: an unsplit head (no tensor parallelism). The final norm, the head matmul and the
  cross-entropy fused by token chunks (GPT.head_loss, kernels/linear_ce.py): the [b, S, V] logits
  never exist whole; the head's weight gradient is computed in the same pass as the input
  gradient, so a split-backward schedule computes it in B (parallel/executor.py).
- `of_logits(loss_fn)`: the head's logits (this rank's vocabulary columns under tensor
  parallelism) and `loss_fn(logits, targets)` on them in fp32, outside autocast: the
  vocab-parallel loss (parallel/tensor_ops.py VocabCrossEntropy), or `cross_entropy_sum` where a
  caller wants the unfused definition (the peers' benchmarks).
Targets equal to IGNORE_INDEX (parallel/loss_mask.py) count for nothing in both.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from parallel.loss_mask import IGNORE_INDEX

HeadLoss = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]  # (last chunk, hidden, targets) -> sum
LogitsLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, targets) -> sum


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum of token cross-entropies: logits [B, S, V], targets [B, S] (no vocabulary split)."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum",
                           ignore_index=IGNORE_INDEX)


def fused(chunk: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """hidden x [b, S, h] -> the summed loss of the chunk's unsplit head, fused (GPT.head_loss)."""
    return chunk.head_loss(x, targets)


def of_logits(loss_fn: LogitsLoss) -> HeadLoss:
    """The head loss that computes the chunk's logits [b, S, V or V/tp] and `loss_fn` on them in fp32."""
    def head_loss(chunk: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = chunk.logits(x)  # [b, S, V], under the caller's autocast
        with torch.autocast(x.device.type, enabled=False):
            return loss_fn(logits, targets)
    return head_loss
