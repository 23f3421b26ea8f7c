"""Activation recomputation (`plan.recompute`, `plan.recompute_layers`), as in Korthikanti et al.,
"Reducing activation recomputation in large transformer models".

- full: a Block keeps only its input; its forward runs again inside its backward
  (torch.utils.checkpoint, non-reentrant).
- selective: only the attention core (scores, softmax, attention x V: the s^2 terms) is
  recomputed; the projections and the MLP keep their activations.

`plan.recompute_layers` = k recomputes the first k Blocks of this stage (-1 = all). The Block
stays the same module (its `forward` is wrapped on the instance), so parameter names, module
hooks (ZeRO-3 gathers run around it) and checkpoints are unchanged.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from perfmodel.specs import Plan


class KeptInput(torch.autograd.Function):
    """Identity that saves its input for backward. Under full recomputation the checkpoint keeps
    the Block input alive anyway (for the rerun); routing it through here makes that retained
    tensor visible to saved-tensor accounting (axon.memory) without storing anything extra."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad


def _full(forward: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    def recomputed(x: torch.Tensor, *args: Any) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return forward(x, *args)
        return checkpoint(forward, KeptInput.apply(x), *args, use_reentrant=False)
    return recomputed


def _selective(core: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    def recomputed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return core(q, k, v)
        return checkpoint(core, q, k, v, use_reentrant=False)  # keeps q, k, v; reruns the core
    return recomputed


def apply(model: nn.Module, plan: Plan) -> list[str]:
    """Wrap this stage's Blocks per `plan.recompute`; returns the names of the wrapped layers."""
    if plan.recompute == "none":
        return []
    if plan.recompute not in ("full", "selective"):
        raise ValueError(f"parallel.recompute={plan.recompute!r} must be none, selective or full")
    names = list(model.layers.keys())
    if plan.recompute_layers >= 0:
        names = names[:plan.recompute_layers]
    for name in names:
        block = model.layers[name]
        if plan.recompute == "full":
            block.forward = _full(block.forward)
        else:
            block.attn.core = _selective(block.attn.core)
    return [f"layers.{n}" for n in names]
