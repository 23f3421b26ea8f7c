"""AdamW on flat parameter shards (ZeRO's optimizer): the same arithmetic as
`torch.optim.AdamW(foreach=False)`, element by element, so a sharded update equals the
unsharded one bit for bit on the same gradient. States (Adam m, v) live beside the shard on the
parameters' device; `parallel.offload.HostAdamW` is the host-memory variant.
"""
from __future__ import annotations

import torch

from perfmodel.specs import Optim


def adamw_(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
           step: float, lr: float, cfg: Optim, decay_ranges: list[tuple[int, int]]) -> None:
    """One AdamW update of flat `param` [n] in place; `decay_ranges` are the [a, b) slices that take
    weight decay (matrices), mirroring the optimizer's two parameter groups."""
    if cfg.weight_decay != 0:
        for a, b in decay_ranges:
            param[a:b].mul_(1 - lr * cfg.weight_decay)
    exp_avg.lerp_(grad, 1 - cfg.beta1)
    exp_avg_sq.mul_(cfg.beta2).addcmul_(grad, grad, value=1 - cfg.beta2)
    bias_correction1 = 1 - cfg.beta1 ** step
    bias_correction2 = 1 - cfg.beta2 ** step
    denom = (exp_avg_sq.sqrt() / bias_correction2 ** 0.5).add_(cfg.eps)
    param.addcdiv_(exp_avg, denom, value=-(lr / bias_correction1))


class ShardAdamW:
    """AdamW over flat shards `params` (views the engine owns), states on the same device."""

    def __init__(self, params: list[torch.Tensor], decay: list[list[tuple[int, int]]], cfg: Optim):
        self.params, self.decay, self.cfg = params, decay, cfg
        self.exp_avg = [torch.zeros_like(p) for p in params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in params]
        self.step_count = torch.zeros((), dtype=torch.float32)  # 0-dim, as torch.optim keeps it

    def step(self, grads: list[torch.Tensor], lr: float) -> None:
        self.step_count += 1
        step = self.step_count.item()
        for p, g, m, v, d in zip(self.params, grads, self.exp_avg, self.exp_avg_sq, self.decay):
            adamw_(p, g, m, v, step, lr, self.cfg, d)

    def use_params(self, params: list[torch.Tensor]) -> None:
        """Update `params` from now on (the same values: the engine moved its master shards)."""
        self.params = params

    def reload_params(self) -> None:
        """After a checkpoint load: nothing to do, the update reads the parameters themselves."""

    def device_states(self) -> list[torch.Tensor]:
        return self.exp_avg + self.exp_avg_sq

    def host_states(self) -> list[torch.Tensor]:
        return []
