"""`parallelize`: the parallel mechanisms applied to one pipeline chunk, in one order.

    pipe = pipeline.apply(spec, plan, grid, build_chunk, seq_len)       # chunks on the meta device
    chunks = list(pipe.chunks.values())                                 # in chunk order
    ks = recompute.per_chunk([len(c.layers) for c in chunks], plan.recompute_layers)
    parts = [parallelize(c, spec, plan, grid, k, pipe.recompute_meter) for c, k in zip(chunks, ks)]
    for c, part in zip(chunks, parts): materialize(c, spec, seed, device, part.layouts)  # axon.init
    layouts = layout.complete(layout.merge(*(p.layouts for p in parts)), pipe.named_parameters())

On the meta chunk, in this order:
1. tensor parallelism (plan.tp > 1): the modules `tensor.GPT_STYLES` names become their 3D
   tensor-parallel versions, which report their parameters' layouts; the loss becomes the
   vocab-parallel one. Fused or of the logits, per microbatch by perfmodel/memory.py
   `fused_head_loss` (parallel/head_loss.py `choose`). Depth gathers prefetch one weight ahead
   (`plan.prefetch_tp_weights`) except under ZeRO-3 (`depth_prefetch`).
2. context parallelism: each Block's attention core becomes the cp-sharded one (ring, or the
   Block's own core inside the Ulysses all-to-alls; `parallel.attach`).
3. recomputation: the chunk's first `recompute_layers` Blocks are wrapped (full: the Block's
   forward; selective: the attention core as step 2 left it, so the context-parallel core is what
   reruns). The count is per chunk; `recompute.per_chunk` derives it from the per-stage plan.
Materializing this rank's shards is the caller's next step (`axon.init.materialize` reads
`layouts`; parallel/ does not import axon), and the gradient engine comes after that.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from torch import nn

from launch.grid import Grid
from parallel import context, head_loss, recompute, tensor
from parallel.context import ContextParallel
from parallel.head_loss import HeadLoss
from parallel.layout import ParamLayout
from parallel.recompute import RecomputeMeter
from parallel.tensor import TensorParallel
from perfmodel.specs import ModelSpec, Plan


def depth_prefetch(plan: Plan) -> bool:
    """Whether depth gathers are launched one weight ahead: `plan.prefetch_tp_weights`, except
    under ZeRO-3, whose Block gathers decide when a parameter holds its values (a prefetch would
    read a unit that is freed or still being gathered; ZeRO-3 prefetches its own gathers)."""
    return plan.prefetch_tp_weights and plan.zero < 3


@dataclass(frozen=True)
class Parallelized:
    """What `parallelize` did to one chunk, and what the trainer needs from it."""

    context: ContextParallel  # the data sharder: `context.shard(tokens)` per microbatch
    loss_fn: HeadLoss  # the last chunk's summed loss from its hidden states (parallel/head_loss.py)
    layouts: dict[str, ParamLayout] = field(default_factory=dict)  # of the parameters it sharded
    tensor: Optional[TensorParallel] = None
    recomputed: list[str] = field(default_factory=list)  # names of the recomputed Blocks

    def weights_changed(self) -> None:
        """Call after the parameters change outside autograd (an optimizer step, a load)."""
        if self.tensor is not None:
            self.tensor.weights_changed()


def parallelize(chunk: nn.Module, spec: ModelSpec, plan: Plan, grid: Grid, recompute_layers: Optional[int] = None,
                meter: Optional[RecomputeMeter] = None) -> Parallelized:
    """Apply tensor parallelism, context parallelism and recomputation to the meta `chunk`, in
    that order (see the module docstring). `recompute_layers`: how many of the chunk's Blocks
    recompute (default `plan.recompute_layers`); `meter` receives full recomputation's bytes."""
    tp = tensor.apply(chunk, spec, plan, grid, prefetch=depth_prefetch(plan)) if plan.tp > 1 else None
    ctx = context.apply(chunk, spec, plan, grid)
    names = recompute.apply(chunk, plan, meter, recompute_layers)
    loss_fn = head_loss.choose(spec, plan, tp)
    if tp is None:
        return Parallelized(ctx, loss_fn, recomputed=names)
    return Parallelized(ctx, loss_fn, dict(tp.layouts), tp, names)
