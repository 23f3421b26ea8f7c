"""Attention, one home for its math (issue 16): the model's single-device core, and the block math
that ring attention (parallel/ring_attention.py) runs per ring step, each as a PyTorch path and a
Triton flash-attention path.

    y = attention_torch(q, k, v, positions)          # q [B, S, Hq, hd], k/v [B, S, Hkv, hd] -> [B, S, Hq, hd]
    y = attention_triton(q, k, v, positions)         # the same with the flash kernels
    out, lse = block_reference(q, kv, causal, scale, qd, kd)        # one ring block pair (below)
    dq, dkv = block_backward_reference(q, kv, dout, lse, delta, causal, scale, qd, kd)
    (block_triton / block_backward_triton: the same contract, the flash kernels)

Model path (causal; with per-sample positions [B, S] of packed rows, within each document only:
token i's document starts at i - positions[i]). `attention_torch` is scaled_dot_product_attention:
grouped-query K/V go to the fused kernel as they are (enable_gqa: saved at Hkv heads); where no
fused kernel takes them (`native_gqa`) enable_gqa would fall back to the unfused math path (s^2
probabilities kept), so K/V are repeated to Hq heads first and saved repeated
(docs/activation_memory.md); packed rows pass `document_mask` [B, 1, S, S]. `attention_triton`
(FlashAttention) never builds an [S, S] tensor, reads kv head q_head // rep (no repeat) and
saves q, k, v, the output and the fp32 log-sum-exp [B, Hkv, rep, S], as the fused SDPA kernel does.

Block contract (ring attention's unit of work, also the kernels' interface): queries grouped per
kv head q [B, Hkv, rep, Sq, hd], K/V stacked kv [2, B, Hkv, Sk, hd]; `causal`: a diagonal block,
key j visible to row i iff j <= i; document starts qd [B, Sq] / kd [B, Sk] int64 (or None): a key
is visible only to rows of the same start. Forward: out fp32 [B, Hkv, rep, Sq, hd] normalised
within the block and lse fp32 [B, Hkv, rep, Sq]; a row that sees no key gets zeros and lse -inf
(no NaN), so the log-sum-exp merge gives it weight 0. Backward takes the FINAL lse (after every
block is merged) and delta = rowsum(dout * out) [B, Hkv, rep, Sq] fp32 and returns dq fp32
[B, Hkv, rep, Sq, hd] and dkv fp32 [2, B, Hkv, Sk, hd], summed over the rep query heads of each
kv head. Inputs may be strided views (the zig-zag halves are slices of the local shard).

The reference goes in tiles of Q_TILE query rows (fp32 scores Q_TILE x Sk per head; QK^T and
P are rounded to the inputs' dtype before their matmuls, as torch.matmul computes them). The
Triton kernels are FlashAttention-2 with the rep query heads of a kv head stacked in one tile
(K/V read once per group, no repeat): a forward program per (query block, batch, kv head) with an
online softmax over key blocks (causal blocks stop at the diagonal); the backward recomputes the
probabilities from the lse, one kernel for dk/dv (a program per key block and kv head, looping
over the query blocks: the GQA sum without atomics) and one for dq (a program per query block and
kv head, looping over key blocks). head_dim is padded to a power of two by masking; sequence
lengths need not be multiples of the block; offsets are int64.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F

from kernels.triton_support import triton, tl, block_for

Q_TILE = 256  # reference: query rows per score tile, bounds the fp32 score transient to Q_TILE x Sk per head


# ---- the model path on PyTorch: scaled_dot_product_attention ----

def document_mask(positions: torch.Tensor) -> torch.Tensor:
    """bool [B, 1, S, S] for per-sample positions [B, S] of rows in natural order: query i sees
    key j iff j <= i and both belong to the same document (the same start index i - positions[i])."""
    S = positions.shape[-1]
    idx = torch.arange(S, device=positions.device)  # [S]
    start = idx - positions  # [B, S]: where each token's document starts
    same = start[:, :, None] == start[:, None, :]  # [B, S, S]
    return (same & (idx[None, :] <= idx[:, None]))[:, None]  # [B, 1, S, S]


def native_gqa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor] = None) -> bool:
    """Whether scaled_dot_product_attention runs enable_gqa in a fused kernel for these [B, H, S, hd]
    inputs (and attention `mask`): the CPU flash kernel does; on CUDA only the flash backend (16-bit,
    Ampere or later, no mask)."""
    if q.device.type == "cpu":
        return True
    if q.device.type != "cuda" or not torch.backends.cuda.flash_sdp_enabled():
        return False
    params = torch.backends.cuda.SDPAParams(q, k, v, mask, 0.0, mask is None, True)
    return torch.backends.cuda.can_use_flash_attention(params)


def attention_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    positions: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Causal attention by SDPA (module doc). q [B, S, Hq, hd], k/v [B, S, Hkv, hd] -> [B, S, Hq, hd]."""
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, S, hd]
    mask = None if positions is None else document_mask(positions)  # [B, 1, S, S]
    gqa = q.shape[2] != k.shape[2]
    if gqa and not native_gqa(qt, kt, vt, mask):
        rep = q.shape[2] // k.shape[2]
        kt, vt, gqa = kt.repeat_interleave(rep, dim=1), vt.repeat_interleave(rep, dim=1), False
    if mask is None:
        return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=gqa).transpose(1, 2)
    return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, enable_gqa=gqa).transpose(1, 2)


# ---- the block math, PyTorch reference ----

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


def block_reference(q: torch.Tensor, kv: torch.Tensor, causal: bool, scale: float, qd: Optional[torch.Tensor] = None,
                    kd: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One block pair (module doc): out fp32 [B, Hkv, rep, Sq, hd], lse fp32 [B, Hkv, rep, Sq].
    Query rows go in tiles; a causal tile skips the keys after its last row."""
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


def block_backward_reference(q: torch.Tensor, kv: torch.Tensor, dout: torch.Tensor, lse: torch.Tensor,
                             delta: torch.Tensor, causal: bool, scale: float, qd: Optional[torch.Tensor] = None,
                             kd: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of one block pair given the final lse and delta = rowsum(dout * out) (module doc):
    q, dout [B, Hkv, rep, Sq, hd]; lse, delta [B, Hkv, rep, Sq] -> dq fp32 [B, Hkv, rep, Sq, hd],
    dkv fp32 [2, B, Hkv, Sk, hd]. A row whose final lse is -inf (no key anywhere) gets zeros."""
    B, Hkv, rep, Sq, hd = q.shape
    dq = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    dkv = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)
    if qd is not None:
        lse = lse.masked_fill(lse == float("-inf"), 0.0)  # such a row's scores are all -inf: p = 0, not NaN
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


# ---- the Triton kernels ----

if triton is not None:
    @triton.jit
    def _forward(Q, K, V, O, LSE, QD, KD, scale, Sq, Sk, HD, HKV, REP,
                 q_b, q_g, q_r, q_s, k_b, k_g, k_s, v_b, v_g, v_s, o_b, o_g, o_r, o_s, l_b, l_g, l_r, l_s,
                 qd_b, kd_b, CAUSAL: tl.constexpr, DOCS: tl.constexpr, RB: tl.constexpr, BM: tl.constexpr,
                 BN: tl.constexpr, BD: tl.constexpr, DOT: tl.constexpr):
        """One program per (query block, batch x kv head): out and lse of BM rows of each of the REP
        query heads reading this kv head (RB x BM tile rows, RB = REP padded to a power of two), an
        online softmax over key blocks; K/V are loaded once for the whole group. Offsets are int64
        (no int32 overflow on long sequences; the interpreter also skips its int32 overflow checks)."""
        pid_m, bg = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
        b, g = bg // HKV, bg % HKV
        m = tl.arange(0, RB * BM).to(tl.int64)
        r, rows = m // BM, pid_m * BM + m % BM  # tile row -> (query head in the group, sequence row)
        dims = tl.arange(0, BD)
        row_ok, dim_ok = (r < REP) & (rows < Sq), dims < HD
        q_mask = row_ok[:, None] & dim_ok[None, :]
        q = tl.load(Q + b * q_b + g * q_g + r[:, None] * q_r + rows[:, None] * q_s + dims[None, :], mask=q_mask,
                    other=0.0).to(DOT)  # [RB*BM, BD] (DOT: `_meta`)
        qdoc = tl.load(QD + b * qd_b + rows, mask=row_ok, other=-1) if DOCS else rows
        mx = tl.full([RB * BM], float("-inf"), tl.float32)  # running max
        l = tl.zeros([RB * BM], tl.float32)  # running sum of exp(s - mx)
        acc = tl.zeros([RB * BM, BD], tl.float32)
        hi = tl.minimum(Sk, (pid_m + 1) * BM) if CAUSAL else Sk  # causal: no key tile above the diagonal
        for start in range(0, hi, BN):
            cols = start + tl.arange(0, BN).to(tl.int64)
            col_ok = cols < Sk
            kv_mask = col_ok[:, None] & dim_ok[None, :]
            k = tl.load(K + b * k_b + g * k_g + cols[:, None] * k_s + dims[None, :], mask=kv_mask, other=0.0).to(DOT)
            kdoc = tl.load(KD + b * kd_b + cols, mask=col_ok, other=-2) if DOCS else cols
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale  # [RB*BM, BN] fp32
            ok = row_ok[:, None] & col_ok[None, :]  # key visible to the row
            if CAUSAL:
                ok = ok & (cols[None, :] <= rows[:, None])
            if DOCS:
                ok = ok & (qdoc[:, None] == kdoc[None, :])
            s = tl.where(ok, s, float("-inf"))
            mx_new = tl.maximum(mx, tl.max(s, 1))
            shift = tl.where(mx_new == float("-inf"), 0.0, mx_new)  # a row with no key yet: p = 0, l stays 0
            p = tl.exp(s - shift[:, None])
            alpha = tl.exp(mx - shift)
            v = tl.load(V + b * v_b + g * v_g + cols[:, None] * v_s + dims[None, :], mask=kv_mask, other=0.0).to(DOT)
            acc = acc * alpha[:, None] + tl.dot(p.to(V.dtype.element_ty).to(DOT), v, input_precision="ieee")
            l = l * alpha + tl.sum(p, 1)
            mx = mx_new
        seen = l > 0.0
        out = acc / tl.where(seen, l, 1.0)[:, None]
        tl.store(O + b * o_b + g * o_g + r[:, None] * o_r + rows[:, None] * o_s + dims[None, :],
                 out.to(O.dtype.element_ty), mask=q_mask)
        tl.store(LSE + b * l_b + g * l_g + r * l_r + rows * l_s,
                 tl.where(seen, mx + tl.log(tl.where(seen, l, 1.0)), float("-inf")), mask=row_ok)

    @triton.jit
    def _query_rows(Q, DO, LSE, DELTA, QD, b, g, r, rows, dims, row_ok, q_mask,
                    q_b, q_g, q_r, q_s, do_b, do_g, do_r, do_s, l_b, l_g, l_r, l_s, d_b, d_g, d_r, d_s, qd_b,
                    DOCS: tl.constexpr, DOT: tl.constexpr):
        """The backward's inputs on a tile of query rows (head r, row `rows`): q and dout [RB*BM, BD]
        in the dot dtype, the final lse (0 for a row that sees no key, so its p is 0), delta, and
        the rows' document starts (the rows themselves without documents)."""
        q = tl.load(Q + b * q_b + g * q_g + r[:, None] * q_r + rows[:, None] * q_s + dims[None, :], mask=q_mask,
                    other=0.0).to(DOT)  # [RB*BM, BD]
        do = tl.load(DO + b * do_b + g * do_g + r[:, None] * do_r + rows[:, None] * do_s + dims[None, :],
                     mask=q_mask, other=0.0).to(DOT)
        lse = tl.load(LSE + b * l_b + g * l_g + r * l_r + rows * l_s, mask=row_ok, other=0.0)
        lse = tl.where(lse == float("-inf"), 0.0, lse)
        delta = tl.load(DELTA + b * d_b + g * d_g + r * d_r + rows * d_s, mask=row_ok, other=0.0)
        qdoc = tl.load(QD + b * qd_b + rows, mask=row_ok, other=-1) if DOCS else rows
        return q, do, lse, delta, qdoc

    @triton.jit
    def _backward_dkv(Q, K, V, DO, LSE, DELTA, DK, DV, QD, KD, scale, Sq, Sk, HD, HKV, REP,
                      q_b, q_g, q_r, q_s, k_b, k_g, k_s, v_b, v_g, v_s, do_b, do_g, do_r, do_s,
                      l_b, l_g, l_r, l_s, d_b, d_g, d_r, d_s, dk_b, dk_g, dk_s, dv_b, dv_g, dv_s, qd_b, kd_b,
                      CAUSAL: tl.constexpr, DOCS: tl.constexpr, RB: tl.constexpr, BM: tl.constexpr,
                      BN: tl.constexpr, BD: tl.constexpr, DOT: tl.constexpr):
        """One program per (key block, batch x kv head): dk, dv of BN keys, summed over every query
        block that sees them, the REP query heads of the group together in each tile (the GQA sum)."""
        pid_n, bg = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
        b, g = bg // HKV, bg % HKV
        cols = pid_n * BN + tl.arange(0, BN).to(tl.int64)
        dims = tl.arange(0, BD)
        col_ok, dim_ok = cols < Sk, dims < HD
        kv_mask = col_ok[:, None] & dim_ok[None, :]
        k = tl.load(K + b * k_b + g * k_g + cols[:, None] * k_s + dims[None, :], mask=kv_mask,
                    other=0.0).to(DOT)  # [BN, BD]
        v = tl.load(V + b * v_b + g * v_g + cols[:, None] * v_s + dims[None, :], mask=kv_mask, other=0.0).to(DOT)
        kdoc = tl.load(KD + b * kd_b + cols, mask=col_ok, other=-2) if DOCS else cols
        dk = tl.zeros([BN, BD], tl.float32)
        dv = tl.zeros([BN, BD], tl.float32)
        m = tl.arange(0, RB * BM).to(tl.int64)
        r = m // BM
        lo = (pid_n * BN // BM) * BM if CAUSAL else 0  # causal: query blocks above these keys see none
        for start in range(lo, Sq, BM):
            rows = start + m % BM
            row_ok = (r < REP) & (rows < Sq)
            q_mask = row_ok[:, None] & dim_ok[None, :]
            q, do, lse, delta, qdoc = _query_rows(Q, DO, LSE, DELTA, QD, b, g, r, rows, dims, row_ok, q_mask,
                                                  q_b, q_g, q_r, q_s, do_b, do_g, do_r, do_s, l_b, l_g, l_r, l_s,
                                                  d_b, d_g, d_r, d_s, qd_b, DOCS, DOT)
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale  # [RB*BM, BN]
            ok = row_ok[:, None] & col_ok[None, :]
            if CAUSAL:
                ok = ok & (cols[None, :] <= rows[:, None])
            if DOCS:
                ok = ok & (qdoc[:, None] == kdoc[None, :])
            p = tl.where(ok, tl.exp(tl.where(ok, s, 0.0) - lse[:, None]), 0.0)
            dv += tl.dot(tl.trans(p.to(DO.dtype.element_ty).to(DOT)), do, input_precision="ieee")
            dp = tl.dot(do, tl.trans(v), input_precision="ieee")  # [RB*BM, BN]
            ds = p * (dp - delta[:, None]) * scale
            dk += tl.dot(tl.trans(ds.to(Q.dtype.element_ty).to(DOT)), q, input_precision="ieee")
        tl.store(DK + b * dk_b + g * dk_g + cols[:, None] * dk_s + dims[None, :], dk.to(DK.dtype.element_ty),
                 mask=kv_mask)
        tl.store(DV + b * dv_b + g * dv_g + cols[:, None] * dv_s + dims[None, :], dv.to(DV.dtype.element_ty),
                 mask=kv_mask)

    @triton.jit
    def _backward_dq(Q, K, V, DO, LSE, DELTA, DQ, QD, KD, scale, Sq, Sk, HD, HKV, REP,
                     q_b, q_g, q_r, q_s, k_b, k_g, k_s, v_b, v_g, v_s, do_b, do_g, do_r, do_s,
                     l_b, l_g, l_r, l_s, d_b, d_g, d_r, d_s, dq_b, dq_g, dq_r, dq_s, qd_b, kd_b,
                     CAUSAL: tl.constexpr, DOCS: tl.constexpr, RB: tl.constexpr, BM: tl.constexpr,
                     BN: tl.constexpr, BD: tl.constexpr, DOT: tl.constexpr):
        """One program per (query block, batch x kv head): dq of BM rows of each of the group's REP
        query heads (as `_forward`), looping over key blocks."""
        pid_m, bg = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
        b, g = bg // HKV, bg % HKV
        m = tl.arange(0, RB * BM).to(tl.int64)
        r, rows = m // BM, pid_m * BM + m % BM
        dims = tl.arange(0, BD)
        row_ok, dim_ok = (r < REP) & (rows < Sq), dims < HD
        q_mask = row_ok[:, None] & dim_ok[None, :]
        q, do, lse, delta, qdoc = _query_rows(Q, DO, LSE, DELTA, QD, b, g, r, rows, dims, row_ok, q_mask,
                                              q_b, q_g, q_r, q_s, do_b, do_g, do_r, do_s, l_b, l_g, l_r, l_s,
                                              d_b, d_g, d_r, d_s, qd_b, DOCS, DOT)
        dq = tl.zeros([RB * BM, BD], tl.float32)
        hi = tl.minimum(Sk, (pid_m + 1) * BM) if CAUSAL else Sk
        for start in range(0, hi, BN):
            cols = start + tl.arange(0, BN).to(tl.int64)
            col_ok = cols < Sk
            kv_mask = col_ok[:, None] & dim_ok[None, :]
            k = tl.load(K + b * k_b + g * k_g + cols[:, None] * k_s + dims[None, :], mask=kv_mask, other=0.0).to(DOT)
            v = tl.load(V + b * v_b + g * v_g + cols[:, None] * v_s + dims[None, :], mask=kv_mask, other=0.0).to(DOT)
            kdoc = tl.load(KD + b * kd_b + cols, mask=col_ok, other=-2) if DOCS else cols
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
            ok = row_ok[:, None] & col_ok[None, :]
            if CAUSAL:
                ok = ok & (cols[None, :] <= rows[:, None])
            if DOCS:
                ok = ok & (qdoc[:, None] == kdoc[None, :])
            p = tl.where(ok, tl.exp(tl.where(ok, s, 0.0) - lse[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision="ieee")
            ds = p * (dp - delta[:, None]) * scale
            dq += tl.dot(ds.to(K.dtype.element_ty).to(DOT), k, input_precision="ieee")
        tl.store(DQ + b * dq_b + g * dq_g + r[:, None] * dq_r + rows[:, None] * dq_s + dims[None, :],
                 dq.to(DQ.dtype.element_ty), mask=q_mask)


def _meta(x: torch.Tensor, hd: int, rep: int) -> dict[str, Any]:
    """Tile sizes and the dtype the dots multiply in (DOT). A query tile holds BM rows of each of
    the RB = rep (padded to a power of two) query heads of a kv group. A GPU: RB x BM about 64 rows
    (32 for head_dim above 64, to stay in registers in fp32), 64 keys, DOT the inputs' dtype (the
    loads' casts are no-ops). Triton's CPU interpreter: BM = BN = 16 (fast tiny tests) and DOT fp32,
    since its dot multiplies bf16 as the integers it stores them as; the upcast is exact, so the
    products are the same."""
    bd, rb = block_for(hd), 1 << (rep - 1).bit_length()
    if x.device.type == "cpu":
        return {"RB": rb, "BM": 16, "BN": 16, "BD": bd, "DOT": tl.float32}
    tile = 64 if bd <= 64 else 32
    return {"RB": rb, "BM": max(1, tile // rb), "BN": tile, "BD": bd,
            "DOT": getattr(tl, str(x.dtype).removeprefix("torch."))}


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t with unit stride in its last dimension (what the kernels index)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _docs(qd: Optional[torch.Tensor], kd: Optional[torch.Tensor], dummy: torch.Tensor) -> tuple[Any, Any, int, int]:
    """(QD, KD, their batch strides) for the kernels: unit-stride int64 starts, or a dummy pointer."""
    if qd is None:
        return dummy, dummy, 0, 0
    qd, kd = _rows(qd.to(torch.int64)), _rows(kd.to(torch.int64))
    return qd, kd, qd.stride(0), kd.stride(0)


def flash_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                  causal: bool, scale: float, qd: Optional[torch.Tensor] = None,
                  kd: Optional[torch.Tensor] = None) -> None:
    """Writes out [B, Hkv, rep, Sq, hd] (any dtype) and lse fp32 [B, Hkv, rep, Sq] for q [B, Hkv, rep,
    Sq, hd], k/v [B, Hkv, Sk, hd] (strided views; unit stride in hd for out)."""
    B, Hkv, rep, Sq, hd = q.shape
    Sk = k.shape[2]
    q, k, v = _rows(q), _rows(k), _rows(v)
    QD, KD, qd_b, kd_b = _docs(qd, kd, lse)
    meta = _meta(q, hd, rep)
    grid = (triton.cdiv(Sq, meta["BM"]), B * Hkv)
    _forward[grid](q, k, v, out, lse, QD, KD, scale, Sq, Sk, hd, Hkv, rep,
                   *q.stride()[:4], *k.stride()[:3], *v.stride()[:3], *out.stride()[:4], *lse.stride(),
                   qd_b, kd_b, CAUSAL=causal, DOCS=qd is not None, **meta)


def flash_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor, lse: torch.Tensor,
                   delta: torch.Tensor, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, causal: bool,
                   scale: float, qd: Optional[torch.Tensor] = None, kd: Optional[torch.Tensor] = None) -> None:
    """Writes dq [B, Hkv, rep, Sq, hd] and dk, dv [B, Hkv, Sk, hd] (any dtype, unit stride in hd)
    from the final lse and delta fp32 [B, Hkv, rep, Sq] (strided views)."""
    B, Hkv, rep, Sq, hd = q.shape
    Sk = k.shape[2]
    q, k, v, dout = _rows(q), _rows(k), _rows(v), _rows(dout)
    QD, KD, qd_b, kd_b = _docs(qd, kd, lse)
    meta = _meta(q, hd, rep)
    common = (scale, Sq, Sk, hd, Hkv, rep, *q.stride()[:4], *k.stride()[:3], *v.stride()[:3], *dout.stride()[:4],
              *lse.stride(), *delta.stride())
    _backward_dkv[(triton.cdiv(Sk, meta["BN"]), B * Hkv)](
        q, k, v, dout, lse, delta, dk, dv, QD, KD, *common, *dk.stride()[:3], *dv.stride()[:3], qd_b, kd_b,
        CAUSAL=causal, DOCS=qd is not None, **meta)
    _backward_dq[(triton.cdiv(Sq, meta["BM"]), B * Hkv)](
        q, k, v, dout, lse, delta, dq, QD, KD, *common, *dq.stride()[:4], qd_b, kd_b,
        CAUSAL=causal, DOCS=qd is not None, **meta)


def block_triton(q: torch.Tensor, kv: torch.Tensor, causal: bool, scale: float, qd: Optional[torch.Tensor] = None,
                 kd: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """block_reference's contract on the flash kernels."""
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)  # [B, Hkv, rep, Sq, hd]
    lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)  # [B, Hkv, rep, Sq]
    flash_forward(q, kv[0], kv[1], out, lse, causal, scale, qd, kd)
    return out, lse


def block_backward_triton(q: torch.Tensor, kv: torch.Tensor, dout: torch.Tensor, lse: torch.Tensor,
                          delta: torch.Tensor, causal: bool, scale: float, qd: Optional[torch.Tensor] = None,
                          kd: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """block_backward_reference's contract on the flash kernels."""
    dq = torch.empty(q.shape, dtype=torch.float32, device=q.device)  # [B, Hkv, rep, Sq, hd]
    dkv = torch.empty(kv.shape, dtype=torch.float32, device=kv.device)  # [2, B, Hkv, Sk, hd]
    flash_backward(q, kv[0], kv[1], dout, lse, delta, dq, dkv[0], dkv[1], causal, scale, qd, kd)
    return dq, dkv


def _grouped(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[B, S, Hq, hd] -> the view [B, Hkv, rep, S, hd] (query heads grouped per kv head)."""
    B, S, Hq, hd = x.shape
    return x.view(B, S, kv_heads, Hq // kv_heads, hd).permute(0, 2, 3, 1, 4)


class FlashAttention(torch.autograd.Function):
    """Causal attention on the flash kernels, q [B, S, Hq, hd], k/v [B, S, Hkv, hd] -> [B, S, Hq, hd],
    within documents when `docs` [B, S] (each token's document start) is given. Saves q, k, v, the
    output and lse fp32 [B, Hkv, rep, S]."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                docs: Optional[torch.Tensor]) -> torch.Tensor:
        B, S, Hq, hd = q.shape
        Hkv = k.shape[2]
        if Hq % Hkv:
            raise ValueError(f"attention needs the query heads ({Hq}) to be a multiple of the kv heads ({Hkv}); "
                             f"set model.n_kv_heads to a divisor of model.n_heads")
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # [B, S, Hq, hd]
        lse = torch.empty(B, Hkv, Hq // Hkv, S, dtype=torch.float32, device=q.device)  # [B, Hkv, rep, S]
        scale = hd ** -0.5
        flash_forward(_grouped(q, Hkv), k.transpose(1, 2), v.transpose(1, 2), _grouped(out, Hkv), lse, True, scale,
                      docs, docs)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale, ctx.docs = scale, docs  # docs: int64 derived from the positions, no gradient
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        Hkv = k.shape[2]
        dout = _rows(grad)  # [B, S, Hq, hd]
        delta = (dout.float() * out.float()).sum(-1)  # [B, S, Hq]
        dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))  # contiguous
        flash_backward(_grouped(q, Hkv), k.transpose(1, 2), v.transpose(1, 2), _grouped(dout, Hkv), lse,
                       _grouped(delta[..., None], Hkv)[..., 0], _grouped(dq, Hkv), dk.transpose(1, 2),
                       dv.transpose(1, 2), True, ctx.scale, ctx.docs, ctx.docs)
        return dq, dk, dv, None


def attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     positions: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Causal attention on the flash kernels (module doc); positions [B, S] of packed rows: each
    token's document starts at its index minus its position."""
    docs = None if positions is None else torch.arange(q.shape[1], device=q.device) - positions  # [B, S]
    return FlashAttention.apply(q, k, v, docs)
