"""The op registry: the one dispatch point the model, tensor parallelism and context parallelism
call for their hot ops; each op lives in its own file with a Triton kernel, an autograd.Function
and the PyTorch reference (docs/architecture.md, "Adding a kernel").

    y = kernels.rms_norm(x, weight, eps, kind)        # kind = model.kernels: auto | triton | torch
    q = kernels.rope(q, cos, sin, kind)
    h = kernels.swiglu(gate, up, kind)
    loss = kernels.linear_cross_entropy(x, weight, targets, kind)   # head matmul + CE, fused by chunk
    loss = kernels.cross_entropy(logits, targets, width, kind)      # CE of given logits, by chunk
    y = kernels.linear(x, weight, bias, table)         # table: kernels.gemm_tuning.GemmTable (model.gemm_tuning)
    y = kernels.attention(q, k, v, positions, kind)                 # causal (GQA, packed rows)
    out, lse = kernels.attention_block(q, kv, causal, scale, qd, kd, kind)   # ring attention's block pair
    dq, dkv = kernels.attention_block_backward(q, kv, dout, lse, delta, causal, scale, qd, kd, kind)

`auto` runs Triton on GPUs (where Triton is installed) and the PyTorch path on CPU; `triton`
forces the kernels (on CPU under Triton's interpreter, as the tests do); `torch` forces the
PyTorch path. perfmodel/rules.py validates the setting. The PyTorch path of rms_norm and swiglu
is an autograd.Function running the reference's forward and saving only what its backward needs
(docs/activation_memory.md); rope is the reference itself (it saves only the angle tables).
linear_cross_entropy is chunked on both paths (torch ops or Triton per chunk), never the whole
logits (kernels/linear_ce.py); cross_entropy runs the same per-chunk math on logits that exist
whole (kernels/cross_entropy.py); both take a vocabulary split over a group (torch path).
attention's PyTorch path is scaled_dot_product_attention, its Triton path flash attention (saves
q, k, v, the output and the log-sum-exp either way); the block functions return the block's
log-sum-exp for ring attention's merge (kernels/flash_attention.py).
linear runs each of a Linear's three GEMMs (forward, input and weight gradient) in the layout the
GEMM table chose for its shape (None: torch's own, bitwise F.linear); kernels/gemm.py also gives
those GEMMs to the Linears with their own autograd.Function (tensor parallelism, the pipeline's
deferred weight gradient).
"""
from __future__ import annotations

from typing import Optional

import torch

from kernels import cross_entropy as _cross_entropy, flash_attention, gemm, linear_ce, rmsnorm
from kernels import rope as _rope, swiglu as _swiglu
from kernels.rmsnorm import SumAcross
from kernels.triton_support import available


def use_triton(kind: str, x: torch.Tensor) -> bool:
    """Whether `kind` runs the Triton kernel for a tensor on `x`'s device."""
    if kind == "torch":
        return False
    if kind == "triton":
        if not available():
            raise RuntimeError("model.kernels=triton needs Triton: pip install triton, or set model.kernels=torch")
        return True
    return x.device.type == "cuda" and available()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, kind: str = "auto", width: Optional[int] = None,
             sum_across: Optional[SumAcross] = None) -> torch.Tensor:
    """RMSNorm of x [.., n] (statistics over `width` columns, summed by `sum_across` when the
    row is split over a tensor-parallel group), kernels/rmsnorm.py."""
    if use_triton(kind, x):
        return rmsnorm.rms_norm_triton(x, weight, eps, width, sum_across)
    return rmsnorm.rms_norm_torch(x, weight, eps, width, sum_across)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kind: str = "auto") -> torch.Tensor:
    """x [B, S, H, hd] rotated by the angles cos/sin [S, hd/2], kernels/rope.py."""
    return _rope.rope_triton(x, cos, sin) if use_triton(kind, x) else _rope.rope_reference(x, cos, sin)


def swiglu(gate: torch.Tensor, up: torch.Tensor, kind: str = "auto") -> torch.Tensor:
    """silu(gate) * up, kernels/swiglu.py."""
    return _swiglu.swiglu_triton(gate, up) if use_triton(kind, gate) else _swiglu.swiglu_torch(gate, up)


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, kind: str = "auto",
                         chunk: Optional[int] = None, vocab_start: int = 0,
                         vocab_reduce: Optional[linear_ce.VocabReduce] = None) -> torch.Tensor:
    """Sum over kept targets of the cross-entropy of x [.., h] @ weight[v, h].T against targets [..],
    chunk by chunk over tokens (the vocabulary split over a group under `vocab_reduce`, torch path
    only), kernels/linear_ce.py."""
    triton_path = vocab_reduce is None and use_triton(kind, x)
    return linear_ce.linear_cross_entropy(x, weight, targets, triton_path, chunk, vocab_start, vocab_reduce)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, width: int, kind: str = "auto",
                  vocab_start: int = 0, vocab_reduce: Optional[linear_ce.VocabReduce] = None) -> torch.Tensor:
    """Sum over kept targets of the cross-entropy of logits [.., v] (the whole vocabulary, or this
    rank's columns from vocab_start under `vocab_reduce`, torch path only) against targets [..],
    by the fused loss's token chunks for a head input `width` wide, kernels/cross_entropy.py."""
    triton_path = vocab_reduce is None and use_triton(kind, logits)
    return _cross_entropy.cross_entropy(logits, targets, width, triton_path, None, vocab_start, vocab_reduce)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: Optional[torch.Tensor] = None,
              kind: str = "auto") -> torch.Tensor:
    """Causal attention, q [B, S, Hq, hd], k/v [B, S, Hkv, hd] -> [B, S, Hq, hd]; with per-sample
    positions [B, S] (packed rows) within each document only, kernels/flash_attention.py."""
    if use_triton(kind, q):
        return flash_attention.attention_triton(q, k, v, positions)
    return flash_attention.attention_torch(q, k, v, positions)


def attention_block(q: torch.Tensor, kv: torch.Tensor, causal: bool, scale: float, qd: Optional[torch.Tensor] = None,
                    kd: Optional[torch.Tensor] = None, kind: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """One block pair of ring attention: q [B, Hkv, rep, Sq, hd], kv [2, B, Hkv, Sk, hd] (document
    starts qd [B, Sq], kd [B, Sk] or None) -> out fp32 [B, Hkv, rep, Sq, hd], lse fp32 [B, Hkv, rep, Sq],
    kernels/flash_attention.py."""
    fn = flash_attention.block_triton if use_triton(kind, q) else flash_attention.block_reference
    return fn(q, kv, causal, scale, qd, kd)


def attention_block_backward(q: torch.Tensor, kv: torch.Tensor, dout: torch.Tensor, lse: torch.Tensor,
                             delta: torch.Tensor, causal: bool, scale: float, qd: Optional[torch.Tensor] = None,
                             kd: Optional[torch.Tensor] = None,
                             kind: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of one block pair from the final lse and delta = rowsum(dout * out) [B, Hkv, rep, Sq]
    -> dq fp32 [B, Hkv, rep, Sq, hd], dkv fp32 [2, B, Hkv, Sk, hd], kernels/flash_attention.py."""
    fn = flash_attention.block_backward_triton if use_triton(kind, q) else flash_attention.block_backward_reference
    return fn(q, kv, dout, lse, delta, causal, scale, qd, kd)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
           table: Optional[gemm.GemmTable] = None) -> torch.Tensor:
    """F.linear(x [.., K], weight [N, K], bias [N]) -> [.., N], each GEMM in the layout `table`
    chose for this shape (None: torch's formulations), kernels/gemm.py."""
    return gemm.linear(x, weight, bias, table)
