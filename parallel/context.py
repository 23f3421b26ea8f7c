"""Context (sequence) parallelism: the `cp` grid axis shards every sequence over cp ranks.

Layout (both modes): the sequence is cut into 2*cp equal chunks and rank i holds chunks i and
2cp-1-i (zig-zag), so each rank does the same work under the causal mask; RoPE / learned
positions stay the global ones (`shard` returns them). Attention is the only op that mixes
tokens, so `apply` only replaces each Block's attention core (`parallel.attach`):

- `ring` (default): exact ring attention, K/V blocks travel around the cp ring overlapped with
  the attention of the block in hand (parallel/ring_attention.py).
- `ulysses`: an all-to-all trades the sequence shard for a head shard, the layer's own core runs
  on the full sequence for Hq/cp heads, and a second all-to-all trades back (needs the local
  query heads divisible by cp; kv heads are repeated just enough when they are not).

Packed rows (axon/sft_data.py: per-sample positions [b, S/cp] restarting at 0 per document,
`shard_packed`): the cores take the positions as a fourth argument. Token g (global index) of a
row belongs to the document starting at g - position[g]; ring attention sends these starts around
with K/V and masks keys of other documents; Ulysses all-gathers the positions into natural order
for the inner core, which masks by them (kernels/flash_attention.py `document_mask`).

Usage (the trainer): `ctx = apply(model, spec, plan, grid)` on the meta model, then per
microbatch `inputs, targets, positions = ctx.shard(tokens)` and `model(inputs, positions)`.
Every rank holds S/cp of each sample's tokens: the global token count of a step is unchanged,
the loss sum is partial over `ctx.loss_axes` (all-reduce it there, with the data shards, for
logging), and gradients are summed over dp x cp (the default `grad_axes`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from launch.grid import Grid
from parallel.attach import Core, blocks, wrap_attention_core
from parallel.loss_mask import mask_targets
from parallel.ring_attention import Ring, RingAttention
from perfmodel.specs import ModelSpec, Plan, PlanError


def zigzag_positions(seq_len: int, cp: int, coord: int) -> torch.Tensor:
    """Global positions [seq_len/cp] held by cp rank `coord`: chunks coord and 2cp-1-coord."""
    if cp == 1:
        return torch.arange(seq_len)
    if seq_len % (2 * cp):
        raise PlanError(f"train.seq_len={seq_len} is not divisible by 2 * parallel.cp = {2 * cp} "
                        f"(zig-zag context split); change train.seq_len or parallel.cp")
    c = seq_len // (2 * cp)
    return torch.cat((torch.arange(coord * c, (coord + 1) * c),
                      torch.arange((2 * cp - 1 - coord) * c, (2 * cp - coord) * c)))


class RingCore:
    """`attn.core` replacement: causal ring attention of the local zig-zag shard, its block math
    by `kind` (model.kernels: auto | triton | torch, kernels/flash_attention.py)."""

    def __init__(self, ring: Ring, kind: str = "auto"):
        self.ring, self.kind = ring, kind

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 positions: torch.Tensor | None = None) -> torch.Tensor:
        if positions is None:
            return RingAttention.apply(q, k, v, self.ring, None, self.kind)  # [B, S/cp, Hq, hd]
        cp, s = self.ring.size, q.shape[1]
        g = zigzag_positions(cp * s, cp, self.ring.coord).to(positions.device)  # [S/cp] global indices
        return RingAttention.apply(q, k, v, self.ring, g - positions, self.kind)  # documents' starts [B, S/cp]


class _AllToAll(torch.autograd.Function):
    """x [cp, ...] -> y [cp, ...] with y[j] = (rank j's x)[me]. It is its own adjoint."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        x = x.contiguous()
        y = torch.empty_like(x)  # contiguous too (empty_like would keep a permuted x's strides)
        dist.all_to_all_single(y, x, group=group)
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        return _AllToAll.apply(grad, ctx.group), None


class UlyssesCore:
    """`attn.core` wrapper: sequence shard -> head shard, `inner` on the full sequence, back."""

    def __init__(self, inner: Core, cp: int, group: Any):
        self.inner, self.cp, self.group = inner, cp, group
        self._perms: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}

    def _rank_major(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Global positions [S] of the gathered sequence (rank 0's shard, rank 1's, ...) and their
        inverse permutation, built once per length and device and kept there: no host-to-device
        copy (and no argsort) per layer and microbatch."""
        key = (seq_len, device)
        if key not in self._perms:
            order = torch.cat([zigzag_positions(seq_len, self.cp, j) for j in range(self.cp)]).to(device)
            self._perms[key] = (order, torch.argsort(order))
        return self._perms[key]

    def _to_heads(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, S/cp, H, hd] -> [B, S, H/cp, hd], positions in natural order."""
        B, s, H, hd = x.shape
        x = x.view(B, s, self.cp, H // self.cp, hd).permute(2, 0, 1, 3, 4)  # [cp, B, s, H/cp, hd]
        x = _AllToAll.apply(x, self.group)  # [cp (source rank), B, s, H/cp, hd]
        x = x.permute(1, 0, 2, 3, 4).reshape(B, self.cp * s, H // self.cp, hd)  # rank-major sequence
        return x.index_select(1, self._rank_major(self.cp * s, x.device)[1])

    def _to_seq(self, y: torch.Tensor) -> torch.Tensor:
        """y [B, S, H/cp, hd] (natural order) -> [B, S/cp, H, hd] (this rank's zig-zag shard)."""
        B, S, h, hd = y.shape
        y = y.index_select(1, self._rank_major(S, y.device)[0])
        y = y.view(B, self.cp, S // self.cp, h, hd).permute(1, 0, 2, 3, 4)  # [cp (dest rank), B, s, h, hd]
        y = _AllToAll.apply(y, self.group)  # [cp (head group), B, s, h, hd]
        return y.permute(1, 2, 0, 3, 4).reshape(B, S // self.cp, self.cp * h, hd)

    def _full_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """Per-sample positions of the local shard [B, S/cp] -> the whole rows' [B, S], natural order."""
        parts = [torch.empty_like(positions) for _ in range(self.cp)]
        dist.all_gather(parts, positions.contiguous(), group=self.group)
        rank_major = torch.cat(parts, dim=1)  # [B, S]: rank 0's shard, rank 1's, ...
        return rank_major.index_select(1, self._rank_major(rank_major.shape[1], positions.device)[1])

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 positions: torch.Tensor | None = None) -> torch.Tensor:
        Hq, Hkv = q.shape[2], k.shape[2]
        if Hq % self.cp:
            raise PlanError(f"Ulysses context parallelism needs the local query heads ({Hq}) divisible by "
                            f"parallel.cp={self.cp}; change parallel.cp or set parallel.cp_mode=ring")
        if Hkv % self.cp:  # repeat each kv head just enough; q head h still reads kv head h // rep
            f = self.cp // math.gcd(Hkv, self.cp)
            k, v = k.repeat_interleave(f, dim=2), v.repeat_interleave(f, dim=2)
        # the inner core takes grouped K/V as they are (axon.model.attention_core, enable_gqa): a
        # rank saves the lcm(Hkv, cp)/cp kv heads its query heads read, the fewest it can hold;
        # the repeat and the all-to-alls save nothing
        qkv = (self._to_heads(q), self._to_heads(k), self._to_heads(v))
        if positions is None:
            out = self.inner(*qkv)  # [B, S, Hq/cp, hd]
        else:
            out = self.inner(*qkv, self._full_positions(positions))
        return self._to_seq(out)


@dataclass(frozen=True)
class ContextParallel:
    """What the trainer needs from context parallelism (see the module doc)."""

    cp: int
    coord: int
    mode: str
    loss_axes: tuple[str, ...] = ("cp",)  # the loss sum of a rank covers only its sequence shard

    def shard(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """tokens [b, S+1] -> inputs [b, S/cp], targets [b, S/cp], global positions [S/cp]."""
        positions = zigzag_positions(tokens.shape[1] - 1, self.cp, self.coord).to(tokens.device)
        return tokens[:, positions], tokens[:, positions + 1], positions

    def shard_packed(self, tokens: torch.Tensor, keep: torch.Tensor,
                     positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Packed rows (axon/sft_data.py): tokens [b, S+1], keep [b, S] (bool: target j is trained
        on), per-document positions [b, S+1] -> inputs [b, S/cp], targets [b, S/cp] (IGNORE_INDEX
        where not kept), per-sample positions [b, S/cp]."""
        idx = zigzag_positions(tokens.shape[1] - 1, self.cp, self.coord).to(tokens.device)  # [S/cp]
        return tokens[:, idx], mask_targets(tokens[:, idx + 1], keep[:, idx]), positions[:, idx]

    def local_tokens(self, batch: int, seq_len: int) -> int:
        """Tokens this rank computes the loss on for `batch` samples of `seq_len`."""
        return batch * seq_len // self.cp


def apply(model: nn.Module, spec: ModelSpec, plan: Plan, grid: Grid) -> ContextParallel:
    """Replace every Block's attention core by the cp-sharded one: ring attention, or the Block's
    own core wrapped by the Ulysses all-to-alls (at cp=1 the model's own core is the same math,
    fused, and is left in place). `Plan.check` has validated train.seq_len and the Ulysses head
    split; the cores check again on the shapes they get."""
    axis = grid.axis("cp")
    ctx = ContextParallel(plan.cp, axis.coord, plan.cp_mode)
    if plan.cp == 1:
        return ctx
    ring = Ring(axis.size, axis.coord, axis.ranks, axis.group)
    for _, block in blocks(model):
        if plan.cp_mode == "ring":
            wrap_attention_core(block, lambda core: RingCore(ring, spec.kernels))
        else:
            wrap_attention_core(block, lambda core: UlyssesCore(core, plan.cp, axis.group))
    return ctx
