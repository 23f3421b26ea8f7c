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
Triton path runs the FlashAttention-2 kernels of kernels/flash_kernels.py; here are its entry
points (`block_triton`, `block_backward_triton`) and the model's autograd Function on them
(`FlashAttention`, `attention_triton`).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F

from kernels.flash_kernels import flash_backward, flash_forward, unit_stride

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


# ---- the Triton path: the flash kernels (kernels/flash_kernels.py) ----

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
        dout = unit_stride(grad)  # [B, S, Hq, hd]
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
