"""Where the mechanisms attach to a pipeline chunk: the points at which one mechanism configures
what another built, named once here (the order is `parallel.parallelize`'s).

- `blocks(chunk)`: the chunk's transformer Blocks as (global layer index, Block), in execution
  order (`chunk.layers`, a ModuleDict keyed by global layer index). Full recomputation wraps a
  Block's forward; ZeRO makes units and gather hooks per Block.
- `wrap_attention_core(block, wrap)`: a Block's attention core `block.attn.core`, the callable
  (q [B, S, Hq, hd], k [B, S, Hkv, hd], v [B, S, Hkv, hd]) -> [B, S, Hq, hd] that the model
  calls between its projections, becomes `wrap(current core)`. Context parallelism swaps it
  (ring) or wraps it (Ulysses); selective recomputation then wraps whatever is there, so it
  recomputes the context-parallel core.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

# attention core: (q [B, S, Hq, hd], k, v [B, S, Hkv, hd], optional per-sample positions [B, S] of
# packed rows) -> [B, S, Hq, hd]
Core = Callable[..., torch.Tensor]


def blocks(chunk: nn.Module) -> list[tuple[str, nn.Module]]:
    """The chunk's Blocks as (global layer index, Block), in execution order (none for a module
    without `layers`)."""
    return list(getattr(chunk, "layers", {}).items())


def wrap_attention_core(block: nn.Module, wrap: Callable[[Core], Core]) -> None:
    """Replace the Block's attention core by `wrap(current core)`."""
    block.attn.core = wrap(block.attn.core)
