"""The bytes one Llama-shaped Block (grouped-query attention, SwiGLU, RMSNorm, RoPE) saves for
backward, counted storage by storage with torch.autograd.graph.saved_tensors_hooks and sorted
into the terms of perfmodel.memory.layer_activation_terms, which must match term by term, to the
byte: in fp32, and under bf16 autocast (the residual stream stays fp32, everything else is
16-bit). docs/activation_memory.md has the terms next to Korthikanti et al.'s.

Sorting: the block input and the RoPE tables come from outside (the tables are shared by every
layer: not a per-layer term); fp32 tensors of at most a numbers per token are statistics (norm
rstd, the attention's log-sum-exp); storages derived from a parameter by casts and views are the
autocast weight copies (counted apart, not activations); every other storage goes to the term of
the module that saved it first (the attention output by identity: the output projection's input).
"""
from __future__ import annotations

from collections import defaultdict
from contextlib import nullcontext

import pytest
import torch
from torch import nn

from axon.init import materialize
from axon.model import attention_core, build
from kernels import flash_attention
from perfmodel.memory import layer_activation_terms
from perfmodel.specs import ModelSpec

SPEC = ModelSpec(n_layers=1, d_model=128, n_heads=4, n_kv_heads=2, d_ff=344, vocab_size=64, max_seq_len=128)
S, B = 128, 2
TERMS = {"attn_norm": "norm inputs", "mlp_norm": "norm inputs", "attn.wq": "projection inputs",
         "mlp.w_gate": "projection inputs", "attn": "q, k, v", "mlp": "mlp", "mlp.w_down": "mlp"}


def _parameter_behind(t: torch.Tensor) -> bool:
    """Whether t is a parameter, or made from one by casts and views only."""
    if isinstance(t, nn.Parameter):
        return True
    fn = t.grad_fn
    while fn is not None:
        if hasattr(fn, "variable"):  # AccumulateGrad: a leaf
            return isinstance(fn.variable, nn.Parameter)
        inputs = [f for f, _ in fn.next_functions if f is not None]
        if len(inputs) != 1 or not fn.name().startswith(("ToCopy", "T", "View", "Transpose", "Permute")):
            return False
        fn = inputs[0]
    return False


def saved_bytes(block: nn.Module, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                autocast: bool) -> dict[str, int]:
    """{term: bytes} the block saves for backward on input x [B, S, h] (see the module doc)."""
    stack: list[str] = []  # the module running now (hooks return None: nothing is replaced)

    def leave(*_: object) -> None:
        stack.pop()

    handles = []
    for name, mod in block.named_modules():
        handles.append(mod.register_forward_pre_hook(lambda m, a, n=name: stack.append(n)))
        handles.append(mod.register_forward_hook(leave))
    wo_input: list[int] = []
    handles.append(block.attn.wo.register_forward_pre_hook(
        lambda m, a: wo_input.append(a[0].untyped_storage().data_ptr())))
    outside = {t.untyped_storage().data_ptr(): term for t, term in ((x, "norm inputs"), (rope[0], "rope tables"),
                                                                   (rope[1], "rope tables"))}
    per_token_stats = S * B * SPEC.n_heads
    first: dict[int, tuple[str, int]] = {}  # storage -> (term, bytes)

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage().data_ptr()
        if key in first or t.untyped_storage().nbytes() == 0:
            return t
        if _parameter_behind(t):
            if t.dtype == torch.float32:  # the parameter itself (or a view): not an activation
                return t
            term = "weight copies"
        elif key in outside:
            term = outside[key]
        elif t.dtype == torch.float32 and t.numel() <= per_token_stats:
            term = "statistics"
        else:
            term = TERMS.get(stack[-1].replace(".wk", ".wq").replace(".wv", ".wq").replace(".w_up", ".w_gate"),
                             stack[-1])
        first[key] = (term, t.untyped_storage().nbytes())
        return t

    amp = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), amp:
        y = block(x, rope)
    for h in handles:
        h.remove()
    y.float().sum().backward()
    out: dict[str, int] = defaultdict(int)
    for key, (term, nbytes) in first.items():
        out["attention output" if key in wo_input and term == "q, k, v" else term] += nbytes
    return dict(out)


def measure(autocast: bool) -> dict[str, int]:
    model = build(SPEC)
    materialize(model, SPEC, 0, torch.device("cpu"))
    x = torch.randn(B, S, SPEC.d_model, generator=torch.Generator().manual_seed(0), requires_grad=True)  # [B, S, h]
    return saved_bytes(model.layers["0"], x, model.rope(torch.arange(S)), autocast)


def block_matrix_params() -> int:
    h, kv = SPEC.d_model, SPEC.n_kv_heads * SPEC.head_dim
    return 2 * h * h + 2 * h * kv + 3 * h * SPEC.d_ff


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_block_saves_what_the_formula_says_term_by_term(autocast):
    measured = measure(autocast)
    want = layer_activation_terms(SPEC, S, B, dtype_bytes=2 if autocast else 4, residual_bytes=4)
    for term, nbytes in want.items():
        assert measured.pop(term, 0) == nbytes, term
    # left over: the RoPE tables (cos, sin [S, hd/2] fp32, shared by all layers) and, under
    # autocast only, the bf16 copies of the block's matrices (per microbatch, not per token)
    assert measured.pop("rope tables") == 2 * S * SPEC.head_dim // 2 * 4
    assert measured.pop("weight copies", 0) == (2 * block_matrix_params() if autocast else 0)
    assert measured == {}


def test_per_layer_bytes_in_units_of_sbh():
    """The headline numbers of docs/activation_memory.md for this shape (h = 128, kv = h/2,
    d_ff = 2.6875h): fp32 60.25 sbh, bf16 autocast 34.125 sbh (statistics excluded)."""
    sbh = S * B * SPEC.d_model
    for autocast, expected in ((False, 60.25), (True, 34.125)):
        measured = measure(autocast)
        acts = sum(v for k, v in measured.items() if k not in ("rope tables", "weight copies", "statistics"))
        assert acts / sbh == expected


def test_gqa_without_a_fused_kernel_repeats_kv(monkeypatch):
    """Where no fused kernel takes grouped-query K/V (CUDA without flash), attention_core repeats
    them first: the same output, with K/V saved at every query head."""
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 16, h, 8, generator=g, requires_grad=True) for h in (4, 2, 2))  # [B, S, H, hd]
    seen: list[tuple[int, ...]] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: seen.append(tuple(t.shape)) or t, lambda t: t):
        native = attention_core(q, k, v)
    monkeypatch.setattr(flash_attention, "native_gqa", lambda *_: False)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: seen.append(tuple(t.shape)) or t, lambda t: t):
        repeated = attention_core(q, k, v)
    torch.testing.assert_close(repeated, native)
    # native: q and the output at 4 heads, k and v at 2; repeated: all four at 4 heads
    assert seen.count((2, 2, 16, 8)) == 2 and seen.count((2, 4, 16, 8)) == 2 + 4
