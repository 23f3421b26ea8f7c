"""The loss mask: targets equal to IGNORE_INDEX add nothing to the loss or its gradient.

Every loss function honours it (`head_loss.cross_entropy_sum`, kernels.cross_entropy and the
fused kernels.linear_cross_entropy, split over the vocabulary or not: a negative target counts for
nothing, kernels/linear_ce.py); whatever chooses the tokens to leave out (the Goldfish loss in
axon/goldfish.py, prompt masking) marks them with `mask_targets` and divides the summed loss by
the global count of the tokens kept.
"""
from __future__ import annotations

import torch

IGNORE_INDEX = -100  # the F.cross_entropy default


def mask_targets(targets: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """targets [b, s] with IGNORE_INDEX where `keep` [b, s] (bool) is False."""
    return targets.masked_fill(~keep, IGNORE_INDEX)


def kept(targets: torch.Tensor) -> torch.Tensor:
    """bool [b, s]: the targets that count in the loss."""
    return targets != IGNORE_INDEX
