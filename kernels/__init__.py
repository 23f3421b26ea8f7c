"""The op registry: the one dispatch point the model, tensor parallelism and context parallelism
call for their hot ops; each op lives in its own file with a Triton kernel, an autograd.Function
and the PyTorch reference (docs/architecture.md, "Adding a kernel").

    y = kernels.rms_norm(x, weight, eps, kind)        # kind = model.kernels: auto | triton | torch
    q = kernels.rope(q, cos, sin, kind)
    h = kernels.swiglu(gate, up, kind)
    loss = kernels.linear_cross_entropy(x, weight, targets, kind)   # head matmul + CE, fused by chunk

`auto` runs Triton on GPUs (where Triton is installed) and the PyTorch path on CPU; `triton`
forces the kernels (on CPU under Triton's interpreter, as the tests do); `torch` forces the
PyTorch path. perfmodel/rules.py validates the setting. The PyTorch path of rms_norm and swiglu
is an autograd.Function running the reference's forward and saving only what its backward needs
(docs/activation_memory.md); rope is the reference itself (it saves only the angle tables).
linear_cross_entropy is chunked on both paths (torch ops or Triton per chunk), never the whole
logits (kernels/linear_ce.py).
"""
from __future__ import annotations

from typing import Optional

import torch

from kernels import linear_ce, rmsnorm, rope as _rope, swiglu as _swiglu
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
