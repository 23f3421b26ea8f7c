"""The fused linear cross-entropy (kernels/linear_ce.py) against the unfused definition (F.linear,
then F.cross_entropy summed, parallel/loss_mask.py's ignore index): the loss, d hidden and d head
weight, with ignored targets, on chunk sizes that do not divide the token count, fp32 and bf16;
the Triton chunk kernels (under Triton's interpreter on CPU) against the torch path; the
vocabulary split over a group (two threads standing in for two ranks); the model's head_loss
against its logits + cross_entropy_sum, tied and untied, under autocast. The cross-entropy of given
logits (kernels/cross_entropy.py, the same per-chunk math) against F.cross_entropy on the same
paths, and the trainer's choice between the two (parallel/head_loss.py `choose`).

Tolerances: fp32 1e-5 relative to each output's scale; bf16 2^-7 (one bf16 ulp) relative to the
scale, doubled as in test_kernels.py: the fused path rounds the same bf16 logits and d logits, but
sums dW over chunks in fp32 where the unfused matmul rounds once, and its matmuls see other shapes.
"""
from __future__ import annotations

import threading

import pytest
import torch

import kernels
from kernels.linear_ce import linear_cross_entropy_reference
from kernels.triton_support import available
from parallel.loss_mask import IGNORE_INDEX

TOL = {torch.float32: 1e-5, torch.bfloat16: 2 ** -7}


def close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    scale = want.float().abs().max().clamp_min(1e-12)
    err = (got.float() - want.float()).abs().max() / scale
    assert err <= TOL[dtype] * 2, f"max error {err.item():.3g} relative to the output's scale"


def problem(tokens=(3, 37), width=48, vocab=300, dtype=torch.float32, seed=0, ignore=5):
    """x [.., h], weight [V, h], targets [..] with `ignore` targets set to IGNORE_INDEX."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*tokens, width, generator=g).to(dtype)
    w = (torch.randn(vocab, width, generator=g) / width ** 0.5).to(dtype)
    t = torch.randint(0, vocab, tokens, generator=g)
    t.view(-1)[torch.randperm(t.numel(), generator=g)[:ignore]] = IGNORE_INDEX
    return x, w, t


def run(fn, x, w, t):
    """(loss, d x, d weight) of fn(x, w, t), backward from a loss gradient of 0.5 (as the executor's
    division by the token count would give)."""
    x, w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    loss = fn(x, w, t)
    (loss * 0.5).backward()
    return loss.detach(), x.grad, w.grad


def compare(fn, x, w, t, dtype):
    """fn's (loss, d x, d weight) against the unfused definition's; fn's results (to compare further)."""
    results = run(fn, x, w, t)
    for got, want in zip(results, run(linear_cross_entropy_reference, x, w, t)):
        assert got.dtype == want.dtype
        close(got, want, dtype)
    return results


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [16, 7, 111, 1000, None])  # 111 tokens: 16 and 7 leave a partial chunk
def test_torch_path_equals_the_unfused_loss(chunk, dtype):
    x, w, t = problem(dtype=dtype)
    compare(lambda x, w, t: kernels.linear_cross_entropy(x, w, t, "torch", chunk), x, w, t, dtype)


@pytest.mark.skipif(not available(), reason="Triton is not installed (pip install triton)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk,vocab", [(16, 300), (50, 5000)])  # 5000: more than one vocabulary block
def test_triton_path_equals_the_unfused_loss(chunk, vocab, dtype):
    x, w, t = problem(tokens=(2, 45), vocab=vocab, dtype=dtype, seed=1)
    got = compare(lambda x, w, t: kernels.linear_cross_entropy(x, w, t, "triton", chunk), x, w, t, dtype)
    # the same Triton results (one interpreted run) against the torch path
    for g, want in zip(got, run(lambda x, w, t: kernels.linear_cross_entropy(x, w, t, "torch", chunk), x, w, t)):
        close(g, want, dtype)


@pytest.mark.parametrize("kind", ["torch"] + (["triton"] if available() else []))
def test_all_targets_ignored_gives_zero_loss_and_gradients(kind):
    x, w, t = problem(tokens=(1, 20), ignore=20)
    loss, dx, dw = run(lambda x, w, t: kernels.linear_cross_entropy(x, w, t, kind, 8), x, w, t)
    assert loss.item() == 0 and dx.abs().max().item() == 0 and dw.abs().max().item() == 0


def test_large_logits_stay_finite():
    """Logits around 1e4: the log-sum-exp is shifted by the row max on both paths."""
    x, w, t = problem(tokens=(1, 24), vocab=200, ignore=2)
    x = x * 3000
    kinds = ["torch"] + (["triton"] if available() else [])
    for kind in kinds:
        compare(lambda x, w, t: kernels.linear_cross_entropy(x, w, t, kind, 10), x, w, t, torch.float32)


class ThreadGroup:
    """An in-place all-reduce among `n` threads (one per rank of the vocabulary group)."""

    def __init__(self, n: int):
        self.barrier, self.slots = threading.Barrier(n), [None] * n

    def reduce_for(self, rank: int):
        def reduce(t: torch.Tensor, op: str) -> None:
            self.slots[rank] = t.clone()
            self.barrier.wait()
            stacked = torch.stack(self.slots)
            out = stacked.amax(0) if op == "max" else stacked.sum(0)
            self.barrier.wait()
            t.copy_(out)
        return reduce


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vocabulary_split_over_a_group(dtype):
    """Each rank's rows of the head (300 = 140 + 160, uneven), the targets global: every rank gets
    the whole loss, its rows of dW, and its partial of dX (summed over ranks = the whole dX)."""
    x, w, t = problem(dtype=dtype, seed=2)
    want = run(linear_cross_entropy_reference, x, w, t)
    bounds, group, results = [(0, 140), (140, 300)], ThreadGroup(2), [None, None]

    def rank(r: int) -> None:
        v0, v1 = bounds[r]
        results[r] = run(lambda x, w, t: kernels.linear_cross_entropy(
            x, w, t, "torch", 16, vocab_start=v0, vocab_reduce=group.reduce_for(r)), x, w[v0:v1], t)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for loss, _, _ in results:
        close(loss, want[0], dtype)
    close(results[0][1].float() + results[1][1].float(), want[1], dtype)
    close(torch.cat([results[0][2], results[1][2]]), want[2], dtype)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("autocast", [False, True])
def test_model_head_loss_equals_logits_then_cross_entropy(tied, autocast):
    """GPT.head_loss against the unfused loss path (logits, then head_loss.cross_entropy_sum):
    head_loss.cross_entropy_sum of GPT.logits, with the norm's and the head's gradients; under
    bf16 autocast as the trainer computes the logits."""
    from axon.model import GPT
    from parallel.head_loss import cross_entropy_sum
    from perfmodel.specs import ModelSpec

    spec = ModelSpec(n_layers=1, d_model=32, n_heads=4, vocab_size=257, tied_embeddings=tied, kernels="torch")
    torch.manual_seed(0)
    model = GPT(spec, layer_ids=range(0))  # embedding, norm and head only
    with torch.no_grad():
        model.norm.weight.add_(0.1 * torch.randn(32))
    x = torch.randn(2, 19, 32)
    _, _, t = problem(tokens=(2, 19), vocab=257, seed=3)
    grads = []
    for loss_of in (lambda x: model.head_loss(x, t), lambda x: cross_entropy_sum(model.logits(x), t)):
        model.zero_grad()
        xl = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = loss_of(xl)
        loss.backward()
        grads.append([loss.detach(), xl.grad] + [p.grad for p in model.parameters() if p.grad is not None])
    dtype = torch.bfloat16 if autocast else torch.float32
    assert len(grads[0]) == len(grads[1])
    for got, want in zip(*grads):
        close(got, want, dtype)


def test_only_the_gradients_asked_for():
    """A frozen head (weight without grad) or a detached input: the backward skips that product."""
    x, w, t = problem(seed=4)
    xg = x.clone().requires_grad_()
    kernels.linear_cross_entropy(xg, w, t, "torch", 16).backward()
    wg = w.clone().requires_grad_()
    kernels.linear_cross_entropy(x, wg, t, "torch", 16).backward()
    _, dx, dw = run(linear_cross_entropy_reference, x, w, t)
    close(xg.grad * 0.5, dx, torch.float32)
    close(wg.grad * 0.5, dw, torch.float32)


def logits_problem(dtype=torch.float32, vocab=300, seed=5):
    """logits [3, 37, V] (around the scale of a head's) and targets [3, 37] with ignored ones."""
    x, w, t = problem(vocab=vocab, dtype=dtype, seed=seed)
    return (x.float() @ w.float().t()).to(dtype), t


def run_logits(fn, logits, t):
    """(loss, d logits) of fn(logits, t), backward from a loss gradient of 0.5."""
    logits = logits.detach().clone().requires_grad_()
    loss = fn(logits, t)
    (loss * 0.5).backward()
    return loss.detach(), logits.grad


def compare_logits(fn, logits, t, dtype):
    from parallel.head_loss import cross_entropy_sum

    for got, want in zip(run_logits(fn, logits, t), run_logits(cross_entropy_sum, logits, t)):
        assert got.dtype == want.dtype
        close(got, want, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [16, 7, 1000])
def test_cross_entropy_of_logits_equals_the_unfused_loss(chunk, dtype):
    from kernels.cross_entropy import cross_entropy

    logits, t = logits_problem(dtype)
    compare_logits(lambda lg, t: cross_entropy(lg, t, 48, chunk=chunk), logits, t, dtype)
    if available():
        compare_logits(lambda lg, t: cross_entropy(lg, t, 48, True, chunk), logits, t, dtype)


def test_cross_entropy_default_chunks_and_dispatch():
    """kernels.cross_entropy: the fused loss's chunks for a head input `width` wide (300 logits over
    a 48-wide input: chunks of 256 tokens; 600 tokens: three chunks, the last partial)."""
    g = torch.Generator().manual_seed(6)
    logits, t = torch.randn(2, 300, 300, generator=g), torch.randint(0, 300, (2, 300), generator=g)
    compare_logits(lambda lg, t: kernels.cross_entropy(lg, t, 48, "torch"), logits, t, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_vocabulary_split_over_a_group(dtype):
    """Each rank's columns of the logits (140 + 160), global targets: the whole loss on every rank
    and its columns of d logits."""
    from kernels.cross_entropy import cross_entropy
    from parallel.head_loss import cross_entropy_sum

    logits, t = logits_problem(dtype, seed=7)
    want = run_logits(cross_entropy_sum, logits, t)
    bounds, group, results = [(0, 140), (140, 300)], ThreadGroup(2), [None, None]

    def rank(r: int) -> None:
        v0, v1 = bounds[r]
        results[r] = run_logits(lambda lg, t: cross_entropy(lg, t, 48, chunk=16, vocab_start=v0,
                                                            vocab_reduce=group.reduce_for(r)), logits[..., v0:v1], t)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for loss, _ in results:
        close(loss, want[0], dtype)
    close(torch.cat([results[0][1], results[1][1]], -1), want[1], dtype)


@pytest.mark.parametrize("seq, fused", [(128, False), (256, False), (257, True), (1024, True)])
def test_head_loss_fused_only_past_one_chunk(seq, fused, monkeypatch):
    """The trainer's head loss (parallel/head_loss.py `choose`, no tensor parallelism) fuses a
    microbatch only when its tokens span more than one chunk (perfmodel/memory.py fused_head_loss:
    256 tokens at least); either way the loss equals the unfused definition."""
    from axon.model import GPT
    from parallel import head_loss
    from perfmodel.specs import ModelSpec, Plan

    spec = ModelSpec(n_layers=1, d_model=32, n_heads=4, vocab_size=128, kernels="torch")
    torch.manual_seed(0)
    model = GPT(spec, layer_ids=range(0))
    calls = []
    monkeypatch.setattr(GPT, "head_loss", lambda self, x, t: calls.append(1) or kernels.linear_cross_entropy(
        self.norm(x), self.head.weight, t, "torch"))
    x, t = torch.randn(1, seq, 32), torch.randint(0, 128, (1, seq))
    loss = head_loss.choose(spec, Plan(), None)(model, x, t)
    assert bool(calls) == fused
    want = head_loss.cross_entropy_sum(model.logits(x), t)
    close(loss.detach(), want.detach(), torch.float32)


@pytest.mark.parametrize("plan, tokens, fused", [
    (dict(), 256, False), (dict(), 257, True),  # V 256 over h 128: chunks of max(256, tokens/2)
    (dict(tp_col=2), 512, False),  # 128 columns per rank, narrower than h: one chunk of all tokens
    (dict(tp_col=2, sequence_parallel=True), 4096, False),
    (dict(tp_row=2), 4096, False), (dict(tp_col=2, tp_depth=2), 4096, False),  # 3D heads keep their logits
])
def test_fused_head_loss_rule(plan, tokens, fused):
    """perfmodel/memory.py fused_head_loss on the tiny model (d 128, V 256)."""
    from perfmodel.memory import fused_head_loss
    from perfmodel.specs import ModelSpec, Plan

    assert fused_head_loss(ModelSpec(), Plan(**plan), tokens) is fused
