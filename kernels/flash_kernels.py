"""The FlashAttention-2 Triton kernels of attention's block math (kernels/flash_attention.py has
the contract, the PyTorch reference and the autograd Function) and their launchers:

    flash_forward(q, k, v, out, lse, causal, scale, qd, kd)      # writes out and lse
    flash_backward(q, k, v, dout, lse, delta, dq, dk, dv, causal, scale, qd, kd)   # writes dq, dk, dv

The rep query heads of a kv head are stacked in one tile (K/V read once per group, no repeat): a
forward program per (query block, batch, kv head) with an online softmax over key blocks (causal
blocks stop at the diagonal); the backward recomputes the probabilities from the lse, one kernel
for dk/dv (a program per key block and kv head, looping over the query blocks: the GQA sum
without atomics) and one for dq (a program per query block and kv head, looping over key
blocks). head_dim is padded to a power of two by masking; sequence lengths need not be multiples
of the block; offsets are int64. The kernels are defined only where Triton is installed
(kernels/triton_support.py).
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from kernels.triton_support import triton, tl, block_for


# ---- the kernels ----

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


# ---- the launchers ----

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


def unit_stride(t: torch.Tensor) -> torch.Tensor:
    """t with unit stride in its last dimension (what the kernels index)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _docs(qd: Optional[torch.Tensor], kd: Optional[torch.Tensor], dummy: torch.Tensor) -> tuple[Any, Any, int, int]:
    """(QD, KD, their batch strides) for the kernels: unit-stride int64 starts, or a dummy pointer."""
    if qd is None:
        return dummy, dummy, 0, 0
    qd, kd = unit_stride(qd.to(torch.int64)), unit_stride(kd.to(torch.int64))
    return qd, kd, qd.stride(0), kd.stride(0)


def flash_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                  causal: bool, scale: float, qd: Optional[torch.Tensor] = None,
                  kd: Optional[torch.Tensor] = None) -> None:
    """Writes out [B, Hkv, rep, Sq, hd] (any dtype) and lse fp32 [B, Hkv, rep, Sq] for q [B, Hkv, rep,
    Sq, hd], k/v [B, Hkv, Sk, hd] (strided views; unit stride in hd for out)."""
    B, Hkv, rep, Sq, hd = q.shape
    Sk = k.shape[2]
    q, k, v = unit_stride(q), unit_stride(k), unit_stride(v)
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
    q, k, v, dout = unit_stride(q), unit_stride(k), unit_stride(v), unit_stride(dout)
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
