"""Exact causal ring attention over the context-parallel (cp) ring, zig-zag layout.

Each of the cp ranks holds two of the sequence's 2*cp equal chunks: rank r holds chunks r and
2cp-1-r (its "front" and "back" halves), so under the causal mask every rank does the same work.
K/V travel around the ring (rank r sends to r+1, receives from r-1); while the next block is in
flight, this rank attends to the block in hand. At ring step j the block in hand came from
rank src = r - j (mod cp), and only these block pairs are unmasked:

    j == 0       own K/V: a causal mask on the local concatenation [front, back] is exact
    src < r      all local queries vs the source's front half (fully visible)
    src > r      the local back-half queries vs all of the source's K/V (fully visible)

Packed rows (several documents per row, axon/sft_data.py) add a document mask: each token carries
its document's start (a global index, int64 [B, S]); the starts of the K/V block travel with it
around the ring, and a key is visible only to queries of the same start. A query row may then
see no key of a block (log-sum-exp -inf): it contributes zeros and weight 0 to the merge; every
row sees at least itself at step 0.

Partial results are merged with the log-sum-exp rule; softmax statistics are fp32. Backward
recomputes the probabilities from the saved log-sum-exp (flash-attention style): K/V go around
the ring again, and each K/V block's gradient accumulator travels with it, picking up every
rank's contribution, and arrives home after cp hops.

The block math (one block pair's output and log-sum-exp, and its gradients from the final
log-sum-exp) is the op registry's `attention_block` / `attention_block_backward`
(kernels/flash_attention.py): the flash-attention Triton kernels or the PyTorch reference in
query tiles, chosen by `kind` (model.kernels) and passed in by the caller (parallel/context.py
RingCore); the zig-zag halves are strided views of the local shard, given to it as they are.

Internal layout: queries grouped per kv head, q [B, Hkv, rep, S, hd] (rep = Hq / Hkv, so GQA
never copies K/V), and K/V stacked into one ring message kv [2, B, Hkv, S, hd]. Saved for
backward: that q and kv (copies; the inputs themselves are not kept), the output in the layout it
is returned in (the same storage the output projection saves) and the fp32 log-sum-exp: h + 2kv
+ h elements and a fp32 numbers per token (docs/activation_memory.md). The explicit log-sum-exp
is why this is not scaled_dot_product_attention(enable_gqa=True).
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.distributed as dist

import kernels


class Ring:
    """This rank's place on the cp ring and the non-blocking exchange with its neighbours."""

    def __init__(self, size: int, coord: int, ranks: tuple[int, ...], group: Any):
        self.size, self.coord, self.group = size, coord, group
        self.next = ranks[(coord + 1) % size]  # global ranks (what P2POp expects)
        self.prev = ranks[(coord - 1) % size]

    def exchange(self, send: torch.Tensor) -> tuple[torch.Tensor, list]:
        """Start sending `send` to the next rank and receiving the previous rank's tensor of the
        same shape; returns (receive buffer, requests to wait on)."""
        recv = torch.empty_like(send)
        ops = [dist.P2POp(dist.isend, send, self.next, self.group),
               dist.P2POp(dist.irecv, recv, self.prev, self.group)]
        return recv, dist.batch_isend_irecv(ops)


def _wait(reqs: Optional[list]) -> None:
    for req in reqs or ():
        req.wait()


def _merge(out: torch.Tensor, lse: torch.Tensor, rows: slice, out_b: torch.Tensor, lse_b: torch.Tensor) -> None:
    """Fold block result (out_b, lse_b) into the running (out, lse) on query rows `rows`, in place."""
    o, l = out[..., rows, :], lse[..., rows]
    new = torch.logaddexp(l, lse_b)
    o.mul_(torch.exp(l - new)[..., None]).add_(out_b * torch.exp(lse_b - new)[..., None])
    l.copy_(new)


def _pair(step: int, ring: Ring, half: int) -> tuple[slice, slice, bool]:
    """(query rows, key rows, causal) of the unmasked part at ring `step` (see module doc)."""
    src = (ring.coord - step) % ring.size
    if step == 0:
        return slice(None), slice(None), True
    if src < ring.coord:
        return slice(None), slice(0, half), False
    return slice(half, None), slice(None), False


def _docs_at(docs: Optional[torch.Tensor], part: slice) -> Optional[torch.Tensor]:
    return None if docs is None else docs[:, part]


def ring_forward(q: torch.Tensor, kv: torch.Tensor, ring: Ring, scale: float,
                 docs: Optional[torch.Tensor] = None, kind: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, Hkv, rep, S, hd], kv [2, B, Hkv, S, hd] (local zig-zag shard, S = 2 chunks), document
    starts docs [B, S] int64 of packed rows (or None) -> out fp32 [B, Hkv, rep, S, hd], lse fp32 [B, Hkv, rep, S];
    `kind` (model.kernels) picks the block math's implementation."""
    half = q.shape[3] // 2
    out = lse = None
    kd = docs  # the document starts of the K/V block in hand
    for step in range(ring.size):
        nxt, reqs = ring.exchange(kv) if step + 1 < ring.size else (None, None)  # overlaps the math below
        nxt_d, reqs_d = ring.exchange(kd) if kd is not None and step + 1 < ring.size else (None, None)
        rows, keys, causal = _pair(step, ring, half)
        o, l = kernels.attention_block(q[..., rows, :], kv[..., keys, :], causal, scale, _docs_at(docs, rows),
                                       _docs_at(kd, keys), kind)
        if out is None:
            out, lse = o, l  # step 0 covers every query row
        else:
            _merge(out, lse, rows, o, l)
        _wait(reqs)
        _wait(reqs_d)
        kv, kd = nxt, nxt_d
    return out, lse


def ring_backward(q: torch.Tensor, kv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, dout: torch.Tensor,
                  ring: Ring, scale: float, docs: Optional[torch.Tensor] = None,
                  kind: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients for ring_forward's inputs: dq fp32 [B, Hkv, rep, S, hd], dkv fp32 [2, B, Hkv, S, hd]."""
    half = q.shape[3] // 2
    delta = (dout.float() * out.float()).sum(-1)  # [B, Hkv, rep, S]
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    acc_in = acc_reqs = None  # the accumulator for the K/V block in hand, arriving from rank r-1
    kd = docs
    for step in range(ring.size):
        nxt, reqs = ring.exchange(kv) if step + 1 < ring.size else (None, None)
        nxt_d, reqs_d = ring.exchange(kd) if kd is not None and step + 1 < ring.size else (None, None)
        rows, keys, causal = _pair(step, ring, half)
        dq_b, dkv_b = kernels.attention_block_backward(q[..., rows, :], kv[..., keys, :], dout[..., rows, :],
                                                       lse[..., rows], delta[..., rows], causal, scale,
                                                       _docs_at(docs, rows), _docs_at(kd, keys), kind)
        dq[..., rows, :] += dq_b
        acc = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)
        acc[..., keys, :] = dkv_b
        _wait(acc_reqs)
        if acc_in is not None:
            acc += acc_in
        if ring.size > 1:  # pass the accumulator on; after the last step it reaches its owner
            acc_in, acc_reqs = ring.exchange(acc)
        else:
            acc_in = acc
        _wait(reqs)
        _wait(reqs_d)
        kv, kd = nxt, nxt_d
    _wait(acc_reqs)
    return dq, acc_in


class RingAttention(torch.autograd.Function):
    """Causal attention of the local zig-zag shard. q [B, S, Hq, hd], k/v [B, S, Hkv, hd] -> [B, S, Hq, hd];
    with `docs` [B, S] int64 (packed rows: each token's document start), within documents only;
    `kind` (model.kernels: auto | triton | torch) picks the block math's implementation."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ring: Ring,
                docs: Optional[torch.Tensor] = None, kind: str = "auto") -> torch.Tensor:
        B, S, Hq, hd = q.shape
        Hkv = k.shape[2]
        if S % 2:
            raise ValueError(f"ring attention needs the local sequence to hold two zig-zag chunks, got {S} tokens; "
                             f"train.seq_len must be divisible by 2 * parallel.cp")
        qg = q.view(B, S, Hkv, Hq // Hkv, hd).permute(0, 2, 3, 1, 4).contiguous()  # [B, Hkv, rep, S, hd]
        kv = torch.stack((k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3))).contiguous()  # [2, B, Hkv, S, hd]
        scale = 1.0 / math.sqrt(hd)
        out, lse = ring_forward(qg, kv, ring, scale, docs, kind)
        y = out.to(q.dtype).permute(0, 3, 1, 2, 4).reshape(B, S, Hq, hd)  # the output projection's input too
        ctx.save_for_backward(qg, kv, y, lse)  # y, not out: one saved copy of the output
        ctx.ring, ctx.scale, ctx.docs, ctx.kind = ring, scale, docs, kind  # docs: int, no gradient
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        qg, kv, y, lse = ctx.saved_tensors
        B, Hkv, rep, S, hd = qg.shape
        out = y.view(B, S, Hkv, rep, hd).permute(0, 2, 3, 1, 4)  # [B, Hkv, rep, S, hd], a view
        dout = grad.reshape(B, S, Hkv, rep, hd).permute(0, 2, 3, 1, 4).contiguous()  # [B, Hkv, rep, S, hd]
        dq, dkv = ring_backward(qg, kv, out, lse, dout, ctx.ring, ctx.scale, ctx.docs, ctx.kind)
        dq = dq.to(grad.dtype).permute(0, 3, 1, 2, 4).reshape(B, S, Hkv * rep, hd)
        dk, dv = (d.to(grad.dtype).permute(0, 2, 1, 3) for d in dkv)  # [B, S, Hkv, hd]
        return dq, dk, dv, None, None, None
