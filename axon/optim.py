"""The learning-rate schedule: linear warm-up, then cosine decay. (AdamW, the global gradient
norm and clipping belong to the gradient engines: parallel/grad_engine.py.)"""
from __future__ import annotations

import math

from perfmodel.specs import Optim


def lr_at(step: int, base_lr: float, optim: Optim, total_steps: int) -> float:
    """Linear warm-up over `warmup_steps`, then cosine down to base_lr * min_lr_ratio."""
    if step < optim.warmup_steps:
        return base_lr * (step + 1) / optim.warmup_steps
    span = max(1, total_steps - optim.warmup_steps)
    progress = min(1.0, (step - optim.warmup_steps) / span)
    floor = base_lr * optim.min_lr_ratio
    return floor + 0.5 * (base_lr - floor) * (1 + math.cos(math.pi * progress))
