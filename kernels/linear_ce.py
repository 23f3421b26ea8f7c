"""Fused linear cross-entropy: the head matmul and the cross-entropy, chunk by chunk over tokens,
so the [tokens, vocab] logits are never materialized whole (issue 16).

    loss = linear_cross_entropy(x, weight, targets)        # x [.., h], weight [V, h], targets [..]
                                                           # -> fp32 scalar: sum over kept targets

The value and the gradients are those of the unfused definition `linear_cross_entropy_reference`
(F.linear, then F.cross_entropy of the fp32 logits, reduction="sum", a negative target counting
for nothing: parallel/loss_mask.py's IGNORE_INDEX is one; kernels do not import parallel/), with
the logits computed in the inputs' dtype as the unfused head computes them (under autocast: the
autocast dtype).

Design: the backward recomputes each chunk's logits. The forward runs chunk by chunk and keeps only
the per-token log-sum-exp lse [N] fp32; the backward reruns each chunk's matmul, turns the chunk of
logits into its gradient (softmax - one-hot, times the loss's gradient, zero on ignored targets) in
place, and accumulates dX (its rows) and dW (an fp32 [V, h] sum) from it. Liger-Kernel's
FusedLinearCrossEntropy instead computes dX and dW during the forward and keeps them until the
backward: that saves one head matmul (the recompute costs one [N, h] x [h, V] matmul more, a third
more head FLOPs) but holds an [N, h] dX and a [V, h] dW (2.1 GB fp32 for Llama 3 8B's head) per
microbatch from its forward to its backward, and pipeline schedules (parallel/executor.py) keep
several microbatches between F and B on the last stage. Recomputing holds nothing beyond what
the unfused path already keeps (x, weight) but lse; the peak is one chunk's logits (and its fp32
copy for lower-precision logits) plus the dW accumulator (fp32 [v, h], cast to the weight's dtype
at the end; lower-precision d logits are upcast per chunk so dW is multiplied and summed in fp32).

Per chunk, the statistics (lse, the loss) and the gradient come from either the torch ops
(`chunk_stats_torch`, `chunk_grad_torch`) or two Triton kernels (one program per token, looping
over the vocabulary in blocks: an online max / sum-exp with the target logit; then
exp(l - lse) - one-hot, masked and scaled, written over the logits). The matmuls stay torch.matmul.

Vocabulary split (`vocab_reduce`, `vocab_start`): weight holds this rank's rows [V/n, h] from
vocab_start; `vocab_reduce(t, op)` all-reduces t in place over the vocabulary group ("max" or
"sum"): per chunk the row max is all-reduced, then the sum-exp and the target logit (found on one
rank). The returned dX is this rank's partial sum (the caller's input must all-reduce it in
backward, as a column-parallel layer's input does: parallel/tensor.py `TPLinear.fused_loss`); dW
is this rank's rows. kernels/cross_entropy.py runs the same per-chunk functions on logits that
exist whole (a head split further than its vocabulary).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from kernels.triton_support import triton, tl, launch_rows
from perfmodel.memory import loss_chunk_tokens

VocabReduce = Callable[[torch.Tensor, str], None]  # in-place all-reduce over the vocab group: "max" | "sum"
VOCAB_BLOCK = 4096  # vocabulary columns per Triton loop step


def linear_cross_entropy_reference(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The unfused definition: x [.., h], weight [V, h], targets [..] -> fp32 sum over kept targets."""
    logits = F.linear(x, weight)  # [.., V]
    kept = torch.where(targets < 0, -100, targets).flatten()  # -100: torch's own ignore_index
    return F.cross_entropy(logits.float().flatten(0, -2), kept, reduction="sum", ignore_index=-100)


def chunk_stats_torch(logits: torch.Tensor, targets: torch.Tensor, vocab_start: int = 0,
                      vocab_reduce: Optional[VocabReduce] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [C, v] (this rank's columns from vocab_start; fp32 logits are overwritten), targets [C]
    global ids -> (lse [C] fp32 over the whole vocabulary, loss [C] fp32, zero on ignored targets)."""
    lf = logits.float()  # [C, v]
    if vocab_reduce is None:  # the whole vocabulary here: one fused op (half the time on CPU)
        lse = torch.logsumexp(lf, -1)  # [C]
        picked = lf.gather(-1, targets.clamp(min=0)[:, None])[:, 0]  # [C] target logits
        return lse, (lse - picked) * (targets >= 0)
    top = lf.amax(-1)  # [C] (amax: no argmax, max(-1) ran 15x slower on CPU)
    vocab_reduce(top, "max")
    local = targets - vocab_start
    inside = (local >= 0) & (local < lf.shape[-1])  # [C]
    picked = lf.gather(-1, local.clamp(0, lf.shape[-1] - 1)[:, None])[:, 0] * inside  # [C] target logits
    stats = torch.stack((lf.sub_(top[:, None]).exp_().sum(-1), picked))  # [2, C]
    vocab_reduce(stats, "sum")
    lse = top + stats[0].log()
    return lse, (lse - stats[1]) * (targets >= 0)


def chunk_grad_torch(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, g: torch.Tensor,
                     vocab_start: int = 0) -> torch.Tensor:
    """d loss / d logits [C, v] in the logits' dtype: (softmax - one-hot) * g, zero rows on ignored
    targets; g is the loss's gradient (a 0-d tensor)."""
    p = logits.float().sub_(lse[:, None]).exp_()  # [C, v], over the fp32 logits in place
    local = targets - vocab_start
    inside = (local >= 0) & (local < p.shape[-1])
    p.scatter_add_(-1, local.clamp(0, p.shape[-1] - 1)[:, None], -inside[:, None].to(p.dtype))
    p.mul_(((targets >= 0) * g)[:, None])
    return p.to(logits.dtype)


if triton is not None:
    @triton.jit
    def _stats(L, T, LSE, LOSS, v, v0, BLOCK: tl.constexpr):
        """One program per token: online max and sum-exp over its row of v logits; the target logit."""
        row = tl.program_id(0)
        t = tl.load(T + row)
        local = t - v0
        m = tl.full([BLOCK], float("-inf"), tl.float32)  # running max per lane
        s = tl.zeros([BLOCK], tl.float32)  # running sum of exp(l - m) per lane
        picked = tl.zeros([BLOCK], tl.float32)
        for start in range(0, v, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < v
            x = tl.load(L + row * v + cols, mask=mask, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, x)
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # a lane with no logit yet: s stays 0
            s = s * tl.exp(m - shift) + tl.exp(x - shift)
            m = m_new
            picked += tl.where(cols == local, x, 0.0)
        top = tl.max(m, 0)
        total = tl.sum(s * tl.exp(m - top), 0)
        lse = top + tl.log(total)
        tl.store(LSE + row, lse)
        tl.store(LOSS + row, tl.where(t >= 0, lse - tl.sum(picked, 0), 0.0))

    @triton.jit
    def _grad(L, T, LSE, G, v, v0, BLOCK: tl.constexpr):
        """One program per token: its row of logits overwritten by (exp(l - lse) - one-hot) * g."""
        row = tl.program_id(0)
        t = tl.load(T + row)
        lse = tl.load(LSE + row)
        scale = tl.where(t >= 0, tl.load(G).to(tl.float32), 0.0)
        for start in range(0, v, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < v
            x = tl.load(L + row * v + cols, mask=mask, other=0.0).to(tl.float32)
            p = tl.exp(x - lse) - tl.where(cols == t - v0, 1.0, 0.0)
            tl.store(L + row * v + cols, (p * scale).to(L.dtype.element_ty), mask=mask)


def chunk_stats_triton(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """chunk_stats_torch (no vocabulary split) by the Triton kernel; logits [C, V] contiguous."""
    C, v = logits.shape
    lse = torch.empty(C, device=logits.device, dtype=torch.float32)
    loss = torch.empty_like(lse)
    launch_rows(_stats, C, logits, targets, lse, loss, v, 0,
                BLOCK=min(VOCAB_BLOCK, triton.next_power_of_2(v)))
    return lse, loss


def chunk_grad_triton(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """chunk_grad_torch (no vocabulary split) by the Triton kernel, written over `logits` [C, V]."""
    C, v = logits.shape
    launch_rows(_grad, C, logits, targets, lse, g.float().reshape(1), v, 0,
                BLOCK=min(VOCAB_BLOCK, triton.next_power_of_2(v)))
    return logits


class LinearCrossEntropyFn(torch.autograd.Function):
    """The fused loss (see the module docstring): saves x, weight and lse [N] fp32; the backward
    recomputes each chunk's logits."""

    @staticmethod
    def forward(ctx, x, weight, targets, chunk, use_triton, vocab_start, vocab_reduce):
        x2, t = x.reshape(-1, x.shape[-1]), targets.reshape(-1)  # [N, h], [N]
        lse = torch.empty(t.shape[0], device=x.device, dtype=torch.float32)  # [N]
        total = torch.zeros((), device=x.device, dtype=torch.float32)
        for i in range(0, t.shape[0], chunk):
            logits = x2[i:i + chunk] @ weight.t()  # [C, v]
            if use_triton:
                lse[i:i + chunk], loss = chunk_stats_triton(logits, t[i:i + chunk])
            else:
                lse[i:i + chunk], loss = chunk_stats_torch(logits, t[i:i + chunk], vocab_start, vocab_reduce)
            total += loss.sum()
            del logits  # before the next chunk's matmul allocates: one chunk alive at a time
        ctx.save_for_backward(x, weight, targets, lse)
        ctx.chunk, ctx.use_triton, ctx.vocab_start = chunk, use_triton, vocab_start
        return total

    @staticmethod
    def backward(ctx, g):
        x, weight, targets, lse = ctx.saved_tensors
        x2, t = x.reshape(-1, x.shape[-1]), targets.reshape(-1)
        need_dx, need_dw = ctx.needs_input_grad[:2]
        dx = torch.empty_like(x2) if need_dx else None  # [N, h]
        dw = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if need_dw else None  # [v, h] fp32
        for i in range(0, t.shape[0], ctx.chunk):
            xc = x2[i:i + ctx.chunk]  # [C, h]
            logits = xc @ weight.t()  # [C, v], recomputed
            if ctx.use_triton:
                d = chunk_grad_triton(logits, t[i:i + ctx.chunk], lse[i:i + ctx.chunk], g)
            else:
                d = chunk_grad_torch(logits, t[i:i + ctx.chunk], lse[i:i + ctx.chunk], g, ctx.vocab_start)
            if need_dx:
                torch.matmul(d, weight, out=dx[i:i + ctx.chunk])
            if need_dw and d.dtype == dw.dtype:
                dw.addmm_(d.t(), xc)  # [v, h], no [v, h] temporary
            elif need_dw:  # lower-precision logits: their rounded d logits, multiplied and summed in fp32
                dw.addmm_(d.t().float(), xc.float())  # a [C, v] fp32 copy, not a [v, h] product
            del logits, d  # one chunk alive at a time
        return (dx.view_as(x) if need_dx else None, dw.to(weight.dtype) if need_dw else None,
                None, None, None, None, None)


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, use_triton: bool = False,
                         chunk: Optional[int] = None, vocab_start: int = 0,
                         vocab_reduce: Optional[VocabReduce] = None) -> torch.Tensor:
    """The fused loss: x [.., h], weight [v, h] (v = V, or this rank's V/n rows from vocab_start under
    `vocab_reduce`), targets [..] -> fp32 sum over kept targets. Under autocast, x and weight are
    cast to the autocast dtype first (as F.linear would be) and the Function runs without it."""
    if use_triton and vocab_reduce is not None:
        raise NotImplementedError("the Triton chunk kernels take a whole vocabulary; use the torch path")
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        dtype = torch.get_autocast_dtype(dev)
        x, weight = x.to(dtype), weight.to(dtype)
    n = targets.numel()
    chunk = chunk or loss_chunk_tokens(n, x.shape[-1], weight.shape[0])
    with torch.autocast(dev, enabled=False):
        return LinearCrossEntropyFn.apply(x.contiguous(), weight.contiguous(), targets.contiguous(), chunk, use_triton,
                                          vocab_start, vocab_reduce)
