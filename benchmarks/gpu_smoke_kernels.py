"""The `triton_kernels` check of benchmarks/gpu_smoke.py: every Triton kernel of the op registry
(kernels/__init__.py) compiled on the GPU, forward and backward against its PyTorch path, and timed
against that path in eager mode, under torch.compile and, where Liger-Kernel is installed, against
Liger's kernel for the same op (the reference the issue names). Sizes are a Llama-3-8B layer's at
8192 tokens, bf16.

On CPU (`--cpu`) it is skipped: the kernels' correctness runs under Triton's interpreter in
tests/kernels, and interpreted timings say nothing.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from benchmarks.gpu_smoke_checks import Ctx, Skip, _fwd_bwd, _rel_err, timed

TOL = 3e-2  # bf16 against the torch path in bf16: both round each output to 8 mantissa bits


def _ops(ctx: Ctx) -> dict[str, tuple[Callable[..., torch.Tensor], list[torch.Tensor], Optional[Callable]]]:
    """op -> (fn(*inputs, kind), inputs requiring grad, Liger's equivalent of fn(*inputs) or None)."""
    import kernels

    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(shape, generator=g) * scale).to(ctx.device, ctx.dtype).requires_grad_()

    tokens, h, f, heads, kv, hd, vocab = 8192, 4096, 14336, 32, 8, 128, 128256
    angles = torch.rand(tokens // 2, hd // 2, generator=g).to(ctx.device) * 6.28  # [S, hd/2]
    cos, sin = angles.cos(), angles.sin()
    targets = torch.randint(0, vocab, (tokens,), generator=g).to(ctx.device)
    liger = _liger()
    return {
        "rms_norm": (lambda x, w, kind: kernels.rms_norm(x, w, 1e-5, kind), [rnd(tokens, h), rnd(h)],
                     liger and (lambda x, w: liger.liger_rms_norm(x, w, 1e-5))),
        "rope": (lambda x, kind: kernels.rope(x, cos, sin, kind), [rnd(2, tokens // 2, heads, hd)], None),
        "swiglu": (lambda a, b, kind: kernels.swiglu(a, b, kind), [rnd(tokens, f), rnd(tokens, f)],
                   liger and (lambda a, b: liger.liger_swiglu(a, b))),
        "linear_cross_entropy": (lambda x, w, kind: kernels.linear_cross_entropy(x, w, targets, kind),
                                 [rnd(tokens, h), rnd(vocab, h, scale=0.02)],
                                 liger and (lambda x, w: liger.liger_fused_linear_cross_entropy(x, w, targets,
                                                                                               reduction="sum"))),
        "attention": (lambda q, k, v, kind: kernels.attention(q, k, v, None, kind),
                      [rnd(2, tokens // 2, heads, hd), rnd(2, tokens // 2, kv, hd), rnd(2, tokens // 2, kv, hd)], None),
    }


def _liger() -> Any:
    """liger_kernel.transformers.functional, or None where Liger-Kernel is not installed."""
    try:
        from liger_kernel.transformers import functional
    except ImportError:
        return None
    return functional


def triton_kernels(ctx: Ctx) -> dict[str, Any]:
    if ctx.cpu:
        raise Skip("Triton kernels compile for a GPU; on CPU they run under TRITON_INTERPRET in tests/kernels")
    out: dict[str, Any] = {}
    for name, (fn, inputs, liger) in _ops(ctx).items():
        probe = fn(*inputs, "torch")
        dout = torch.randn_like(probe) if probe.dim() else torch.ones_like(probe)
        got = _fwd_bwd(lambda *t: fn(*t, "triton"), inputs, dout)
        ref = _fwd_bwd(lambda *t: fn(*t, "torch"), inputs, dout)
        err = max(_rel_err(a, r) for a, r in zip(got, ref))
        if err > TOL:
            raise RuntimeError(f"{name}: Triton vs the torch path, relative error {err:.3g} > {TOL}")
        compiled = torch.compile(lambda *t, fn=fn: fn(*t, "torch"))
        times = {"triton": timed(ctx, lambda: _fwd_bwd(lambda *t: fn(*t, "triton"), inputs, dout), 5),
                 "eager": timed(ctx, lambda: _fwd_bwd(lambda *t: fn(*t, "torch"), inputs, dout), 5),
                 "compile": timed(ctx, lambda: _fwd_bwd(compiled, inputs, dout), 5)}
        if liger is not None:
            try:
                times["liger"] = timed(ctx, lambda: _fwd_bwd(liger, inputs, dout), 5)
            except Exception as e:  # a Liger API this version does not have: named, not fatal
                out[f"{name}_liger"] = f"n/a ({type(e).__name__}: {e})"[:120]
        out[f"{name}_err"] = err
        out[f"{name}_ms"] = {k: round(v * 1e3, 3) for k, v in times.items()}
        out[f"{name}_eager_over_triton"] = times["eager"] / times["triton"]
    return out
