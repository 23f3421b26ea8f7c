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
rank's contribution, and arrives home after cp hops. Plain PyTorch, no fused kernel.

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


Q_TILE = 256  # query rows per score tile: bounds the fp32 score transient to Q_TILE x S/cp per head


def _tiles(n: int) -> list[slice]:
    return [slice(i, min(n, i + Q_TILE)) for i in range(0, n, Q_TILE)]


def _scores(q: torch.Tensor, k: torch.Tensor, row0: int, causal: bool, scale: float,
            same: Optional[torch.Tensor] = None) -> torch.Tensor:
    """q [B, Hkv, rep, Sq, hd], k [B, Hkv, Sk, hd] -> fp32 scaled scores [B, Hkv, rep, Sq, Sk].
    When `causal`, q holds rows row0.. of a diagonal block and key j is visible to row i iff j <= i;
    `same` (bool [B, Sq, Sk], packed rows) hides the keys of other documents."""
    B, Hkv, rep, Sq, hd = q.shape
    Sk = k.shape[2]
    s = torch.matmul(q.reshape(B, Hkv, rep * Sq, hd), k.transpose(-1, -2)).float() * scale
    s = s.view(B, Hkv, rep, Sq, Sk)
    if causal:
        rows = torch.arange(row0, row0 + Sq, device=q.device)
        s.masked_fill_(torch.arange(Sk, device=q.device)[None, :] > rows[:, None], float("-inf"))
    if same is not None:
        s.masked_fill_(~same[:, None, None], float("-inf"))
    return s


def _same_doc(qd: Optional[torch.Tensor], kd: Optional[torch.Tensor], t: slice, n_keys: int) -> Optional[torch.Tensor]:
    """bool [B, tile, n_keys]: query rows t and the first n_keys keys share a document (None: unpacked)."""
    if qd is None:
        return None
    return qd[:, t, None] == kd[:, None, :n_keys]


def _attend(q: torch.Tensor, kv: torch.Tensor, causal: bool, scale: float, qd: Optional[torch.Tensor] = None,
            kd: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One block pair: out fp32 [B, Hkv, rep, Sq, hd] (normalized within the block) and its
    log-sum-exp fp32 [B, Hkv, rep, Sq]. Query rows go in tiles; a causal tile skips the keys
    after its last row. qd [B, Sq], kd [B, Sk]: document starts of packed rows (or None)."""
    B, Hkv, rep, Sq, hd = q.shape
    outs, lses = [], []
    for t in _tiles(Sq):
        kv_t = kv[..., :t.stop, :] if causal else kv  # [2, B, Hkv, Sk_t, hd]
        same = _same_doc(qd, kd, t, kv_t.shape[3])  # [B, tile, Sk_t] or None
        s = _scores(q[..., t, :], kv_t[0], t.start, causal, scale, same)  # [B, Hkv, rep, tile, Sk_t]
        lse = torch.logsumexp(s, dim=-1)
        if same is not None:  # rows that see no key of this block: p = 0 (not NaN), lse stays -inf
            p = torch.exp(s - lse.masked_fill(lse == float("-inf"), 0.0)[..., None]).to(kv.dtype)
        else:
            p = torch.exp(s - lse[..., None]).to(kv.dtype)
        n = t.stop - t.start
        outs.append(torch.matmul(p.view(B, Hkv, rep * n, -1), kv_t[1]).float().view(B, Hkv, rep, n, hd))
        lses.append(lse)
    return torch.cat(outs, dim=3), torch.cat(lses, dim=3)


def _merge(out: torch.Tensor, lse: torch.Tensor, rows: slice, out_b: torch.Tensor, lse_b: torch.Tensor) -> None:
    """Fold block result (out_b, lse_b) into the running (out, lse) on query rows `rows`, in place."""
    o, l = out[..., rows, :], lse[..., rows]
    new = torch.logaddexp(l, lse_b)
    o.mul_(torch.exp(l - new)[..., None]).add_(out_b * torch.exp(lse_b - new)[..., None])
    l.copy_(new)


def _attend_backward(q: torch.Tensor, kv: torch.Tensor, dout: torch.Tensor, lse: torch.Tensor, delta: torch.Tensor,
                     causal: bool, scale: float, qd: Optional[torch.Tensor] = None,
                     kd: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of one block pair given the final lse and delta = rowsum(dout * out).

    q, dout [B, Hkv, rep, Sq, hd]; lse, delta [B, Hkv, rep, Sq] -> dq fp32 [B, Hkv, rep, Sq, hd],
    dkv fp32 [2, B, Hkv, Sk, hd] (summed over the rep query heads sharing each kv head)."""
    B, Hkv, rep, Sq, hd = q.shape
    dq = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    dkv = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)
    for t in _tiles(Sq):
        kv_t = kv[..., :t.stop, :] if causal else kv  # [2, B, Hkv, Sk_t, hd]
        Sk, n = kv_t.shape[3], t.stop - t.start
        q_t = q[..., t, :].reshape(B, Hkv, rep * n, hd)
        dout_t = dout[..., t, :].reshape(B, Hkv, rep * n, hd)
        same = _same_doc(qd, kd, t, Sk)  # [B, n, Sk_t] or None
        p = torch.exp(_scores(q[..., t, :], kv_t[0], t.start, causal, scale, same) - lse[..., t, None])
        dv = torch.matmul(p.view(B, Hkv, rep * n, Sk).transpose(-1, -2).to(dout.dtype), dout_t)  # [B, Hkv, Sk_t, hd]
        dp = torch.matmul(dout_t, kv_t[1].transpose(-1, -2)).float().view(B, Hkv, rep, n, Sk)
        ds = (p * (dp - delta[..., t, None]) * scale).to(q.dtype).view(B, Hkv, rep * n, Sk)
        dq[..., t, :] = torch.matmul(ds, kv_t[0]).float().view(B, Hkv, rep, n, hd)
        dk = torch.matmul(ds.transpose(-1, -2), q_t)  # [B, Hkv, Sk_t, hd]
        dkv[..., :Sk, :] += torch.stack((dk, dv)).float()
    return dq, dkv


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
                 docs: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, Hkv, rep, S, hd], kv [2, B, Hkv, S, hd] (local zig-zag shard, S = 2 chunks), document
    starts docs [B, S] int64 of packed rows (or None) -> out fp32 [B, Hkv, rep, S, hd], lse fp32 [B, Hkv, rep, S]."""
    half = q.shape[3] // 2
    out = lse = None
    kd = docs  # the document starts of the K/V block in hand
    for step in range(ring.size):
        nxt, reqs = ring.exchange(kv) if step + 1 < ring.size else (None, None)  # overlaps the math below
        nxt_d, reqs_d = ring.exchange(kd) if kd is not None and step + 1 < ring.size else (None, None)
        rows, keys, causal = _pair(step, ring, half)
        o, l = _attend(q[..., rows, :], kv[..., keys, :], causal, scale, _docs_at(docs, rows), _docs_at(kd, keys))
        if out is None:
            out, lse = o, l  # step 0 covers every query row
        else:
            _merge(out, lse, rows, o, l)
        _wait(reqs)
        _wait(reqs_d)
        kv, kd = nxt, nxt_d
    return out, lse


def ring_backward(q: torch.Tensor, kv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, dout: torch.Tensor,
                  ring: Ring, scale: float, docs: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
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
        dq_b, dkv_b = _attend_backward(q[..., rows, :], kv[..., keys, :], dout[..., rows, :], lse[..., rows],
                                       delta[..., rows], causal, scale, _docs_at(docs, rows), _docs_at(kd, keys))
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
    with `docs` [B, S] int64 (packed rows: each token's document start), within documents only."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ring: Ring,
                docs: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, S, Hq, hd = q.shape
        Hkv = k.shape[2]
        if S % 2:
            raise ValueError(f"ring attention needs the local sequence to hold two zig-zag chunks, got {S} tokens; "
                             f"train.seq_len must be divisible by 2 * parallel.cp")
        qg = q.view(B, S, Hkv, Hq // Hkv, hd).permute(0, 2, 3, 1, 4).contiguous()  # [B, Hkv, rep, S, hd]
        kv = torch.stack((k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3))).contiguous()  # [2, B, Hkv, S, hd]
        scale = 1.0 / math.sqrt(hd)
        out, lse = ring_forward(qg, kv, ring, scale, docs)
        y = out.to(q.dtype).permute(0, 3, 1, 2, 4).reshape(B, S, Hq, hd)  # the output projection's input too
        ctx.save_for_backward(qg, kv, y, lse)  # y, not out: one saved copy of the output
        ctx.ring, ctx.scale, ctx.docs = ring, scale, docs  # docs: int, no gradient
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        qg, kv, y, lse = ctx.saved_tensors
        B, Hkv, rep, S, hd = qg.shape
        out = y.view(B, S, Hkv, rep, hd).permute(0, 2, 3, 1, 4)  # [B, Hkv, rep, S, hd], a view
        dout = grad.reshape(B, S, Hkv, rep, hd).permute(0, 2, 3, 1, 4).contiguous()  # [B, Hkv, rep, S, hd]
        dq, dkv = ring_backward(qg, kv, out, lse, dout, ctx.ring, ctx.scale, ctx.docs)
        dq = dq.to(grad.dtype).permute(0, 3, 1, 2, 4).reshape(B, S, Hkv * rep, hd)
        dk, dv = (d.to(grad.dtype).permute(0, 2, 1, 3) for d in dkv)  # [B, S, Hkv, hd]
        return dq, dk, dv, None, None
