"""Activation recomputation (`plan.recompute`, `plan.recompute_layers`), as in Korthikanti et al.,
"Reducing activation recomputation in large transformer models".

- full: a Block keeps only its input; its forward runs again inside its backward
  (torch.utils.checkpoint, non-reentrant). A `RecomputeMeter` reports what each rerun keeps.
- selective: only the attention core (scores, softmax, attention x V: the s^2 terms) is
  recomputed; the projections and the MLP keep their activations.

`plan.recompute_layers` = k recomputes the first k Blocks of each pipeline stage (-1 = all), as
the performance model prices it (perfmodel.memory, perfmodel.estimate). A stage with several
chunks (interleaved and V schedules) counts its Blocks in chunk order, i.e. in the order of
their global layer index: `per_chunk` splits k into how many Blocks each chunk recomputes, and
`apply(chunk, plan, meter, layers)` wraps the first `layers` Blocks of one chunk (default k: a
chunk that is the whole stage). The Block stays the same module (its `forward` is wrapped on the
instance; the selective wrap goes through `parallel.attach`), so parameter names, module hooks
(ZeRO-3 gathers run around it) and checkpoints are unchanged.
"""
from __future__ import annotations

import weakref
from contextlib import nullcontext
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode  # torch's documented home of dispatch modes
from torch.utils.checkpoint import checkpoint

from parallel.attach import Core, blocks, wrap_attention_core
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


class RecomputeMeter:
    """The bytes a Block rematerialized by full recomputation keeps for its backward. They exist
    only inside backward (saved-tensor accounting of the forward sees just the Block input), so a
    memory measurement that ignored them would be low by one Block's activations. While `sink` is
    set (the pipeline sets it on steps that track memory), each rematerialization reports them."""

    def __init__(self) -> None:
        self.sink: Callable[[int], None] | None = None

    def contexts(self) -> tuple[Any, Any]:
        """torch.utils.checkpoint's context_fn: (forward context, recomputation context)."""
        return nullcontext(), (_Rematerialized(self.sink) if self.sink is not None else nullcontext())


class _Rematerialized(TorchDispatchMode):
    """Active while checkpoint reruns a Block's forward: notes every storage an op creates (views
    of their inputs excluded) and, when the rerun ends, reports the bytes of those still alive,
    i.e. what the rerun keeps for the backward (the temporaries are gone by then)."""

    def __init__(self, sink: Callable[[int], None]):
        super().__init__()
        self.sink = sink
        self.created: dict[int, tuple[weakref.ref, int]] = {}  # storage id -> (its weak ref, bytes)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for storage in new_storages(args, kwargs, out):
            key = id(storage)  # torch keeps one Python object per live storage
            seen = self.created.get(key)  # the id of a freed one can be reused: replace it
            if seen is None or seen[0]() is None:
                self.created[key] = (weakref.ref(storage), storage.nbytes())
        return out

    def __exit__(self, *exc: Any) -> Any:
        self.sink(sum(n for ref, n in self.created.values() if ref() is not None))
        self.created.clear()
        return super().__exit__(*exc)


def new_storages(args: Any, kwargs: Any, out: Any) -> Iterator[torch.UntypedStorage]:
    """The storages of an op's result `out` that none of its inputs holds (views of the inputs
    excluded): what the op allocated."""
    inputs = {id(t.untyped_storage()) for t in tensors_in((args, kwargs))}
    for t in tensors_in(out):
        storage = t.untyped_storage()
        if id(storage) not in inputs:
            yield storage


def tensors_in(obj: Any) -> Iterator[torch.Tensor]:
    """The tensors in an op's arguments or result (nested tuples, lists and dicts)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from tensors_in(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from tensors_in(item)


def _full(forward: Callable[..., torch.Tensor], meter: RecomputeMeter) -> Callable[..., torch.Tensor]:
    def recomputed(x: torch.Tensor, *args: Any) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return forward(x, *args)
        return checkpoint(forward, KeptInput.apply(x), *args, use_reentrant=False, context_fn=meter.contexts)
    return recomputed


def _selective(core: Core) -> Core:
    def recomputed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *positions: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return core(q, k, v, *positions)
        # keeps q, k, v (and packed rows' positions [b, S]); reruns the core
        return checkpoint(core, q, k, v, *positions, use_reentrant=False)
    return recomputed


def per_chunk(blocks_per_chunk: Sequence[int], stage_layers: int) -> list[int]:
    """How many Blocks each chunk of a stage recomputes (chunks in chunk order, with that many
    Blocks each) so that the stage recomputes its first `stage_layers` Blocks (-1 = all)."""
    left = sum(blocks_per_chunk) if stage_layers < 0 else stage_layers
    out = []
    for n in blocks_per_chunk:
        out.append(min(n, left))
        left -= out[-1]
    return out


def apply(model: nn.Module, plan: Plan, meter: RecomputeMeter | None = None,
          layers: Optional[int] = None) -> list[str]:
    """Wrap the first `layers` Blocks of this chunk (default `plan.recompute_layers`; -1 = all)
    per `plan.recompute`; returns the names of the wrapped layers. `meter` (full recomputation)
    receives the rematerialized bytes while memory is tracked."""
    if plan.recompute == "none":
        return []
    if plan.recompute not in ("full", "selective"):
        raise ValueError(f"parallel.recompute={plan.recompute!r} must be none, selective or full")
    k = plan.recompute_layers if layers is None else layers
    chosen = blocks(model) if k < 0 else blocks(model)[:k]
    for _, block in chosen:
        if plan.recompute == "full":
            block.forward = _full(block.forward, meter or RecomputeMeter())
        else:
            wrap_attention_core(block, _selective)
    return [f"layers.{name}" for name, _ in chosen]
