"""AdamW, the warm-up + cosine learning-rate schedule, and global-norm gradient clipping that is
correct when parameters are sharded (each shard's squares summed once over its group)."""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch
import torch.distributed as dist
from torch import nn

from axon.config import Optim


def build_optimizer(model: nn.Module, optim: Optim, lr: float,
                    full_dims: Mapping[nn.Parameter, int] | None = None) -> torch.optim.Optimizer:
    """AdamW; matrices decay, vectors (norms, biases) do not. `full_dims`: the number of
    dimensions of the full tensor of a sharded parameter (a tp_depth slice of a matrix is a flat
    vector locally but still decays)."""
    full_dims = full_dims or {}
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if full_dims.get(p, p.dim()) >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": optim.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(optim.beta1, optim.beta2), eps=optim.eps,
                             foreach=False)

def lr_at(step: int, base_lr: float, optim: Optim, total_steps: int) -> float:
    """Linear warm-up over `warmup_steps`, then cosine down to base_lr * min_lr_ratio."""
    if step < optim.warmup_steps:
        return base_lr * (step + 1) / optim.warmup_steps
    span = max(1, total_steps - optim.warmup_steps)
    progress = min(1.0, (step - optim.warmup_steps) / span)
    floor = base_lr * optim.min_lr_ratio
    return floor + 0.5 * (base_lr - floor) * (1 + math.cos(math.pi * progress))

def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr

def global_grad_norm(named: Mapping[str, torch.Tensor], weights: Mapping[str, float], tensor_group: Any = None,
                     stage_group: Any = None) -> torch.Tensor:
    """L2 norm of the full gradient when parameters are sharded. A parameter split into n distinct
    pieces over a tensor-parallel group of t ranks has each piece on t/n ranks, so weighting its
    squares by n/t (`weights`) and summing over the group counts every element once; pipeline
    stages hold different parameters and are summed over `stage_group`."""
    device = next(iter(named.values())).device
    sq = torch.zeros((), dtype=torch.float32, device=device)
    for name, p in named.items():
        if p.grad is not None:
            sq += p.grad.detach().float().pow(2).sum() * weights[name]
    for group in (tensor_group, stage_group):
        if group is not None:
            dist.all_reduce(sq, group=group)
    return sq.sqrt()


def clip_(params: list[torch.Tensor], norm: torch.Tensor, max_norm: float) -> None:
    """Scale gradients in place so their global norm is at most `max_norm` (0 disables)."""
    if max_norm <= 0:
        return
    scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for p in params:
        if p.grad is not None:
            p.grad.mul_(scale.to(p.grad.device))
