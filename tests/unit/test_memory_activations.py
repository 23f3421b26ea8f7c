"""Measured activation bytes of one Block (axon.memory.ActivationMeter) against Korthikanti et al.
(docs/architecture.md, Formulas), adjusted to these runs, and the meter's bookkeeping.

The paper's per-layer bytes, bf16 with dropout: sbh(34 + 5as/h). Adjusted:
- no dropout: the two residual dropout masks (sbh each, 1 byte/element), the attention dropout
  mask (as^2b) and the dropout output (2as^2b) are absent: sbh(32 + 2as/h); selective keeps 32sbh;
- fp32 (4 bytes, not 2): every term doubles -> none sbh(64 + 4as/h), selective 64sbh, full 4sbh
  (the layer input only);
- a fused attention core (PyTorch's scaled_dot_product_attention, the model's default) keeps no
  s^2 tensor, so without recomputation the layer also keeps 64sbh.
The paper's layer is a GPT-2 block (LayerNorm, multi-head attention, GELU MLP of 4h, learned
positions), so that is the block measured. The s^2 term is checked with an unfused attention core
(explicit softmax(QK^T)V) installed through the model's replaceable `attn.core`.

The Llama block (RMSNorm, RoPE, grouped-query attention, SwiGLU) is checked against
perfmodel.memory.layer_activation_terms itself, to the byte: every term, the per-token statistics
included, plus the RoPE tables (shared by all layers); tests/unit/test_activation_bytes.py checks
it term by term, in fp32 and under bf16 autocast.
"""
from __future__ import annotations

import math

import pytest
import torch

from axon.init import materialize
from axon.memory import ActivationMeter
from axon.model import build
from parallel import recompute
from perfmodel.memory import layer_activation_bytes, layer_activation_terms
from perfmodel.specs import ModelSpec, Plan

GPT2 = ModelSpec(n_layers=2, d_model=128, n_heads=4, n_kv_heads=4, d_ff=512, mlp="gelu", norm="layernorm",
                 pos="learned", vocab_size=64, max_seq_len=128)
S, B = 128, 2


def unfused_core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention with the score matrix materialized. q, k, v [B, S, H, hd] -> [B, S, H, hd]."""
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, S, hd]
    scores = qt @ kt.transpose(-1, -2) / math.sqrt(q.shape[-1])  # [B, H, S, S]
    mask = torch.ones(q.shape[1], q.shape[1], dtype=torch.bool).triu(1)
    return (scores.masked_fill(mask, float("-inf")).softmax(-1) @ vt).transpose(1, 2)


LLAMA = ModelSpec(n_layers=2, d_model=128, n_heads=4, n_kv_heads=2, d_ff=344, vocab_size=64, max_seq_len=128)


def layer_bytes(mode: str, fused: bool, spec: ModelSpec = GPT2) -> tuple[int, int]:
    """(peak saved bytes of one Block's forward, live bytes after its backward)."""
    model = build(spec)
    if not fused:
        for block in model.layers.values():
            block.attn.core = unfused_core
    recompute.apply(model, Plan(recompute=mode))
    materialize(model, spec, 0, torch.device("cpu"))
    x = torch.randn(B, S, spec.d_model, requires_grad=True)  # [B, S, h]
    with ActivationMeter() as meter:
        y = model.layers["0"](x, model.rope(torch.arange(S)))
    y.sum().backward()
    return meter.peak, meter.live


def korthikanti_fp32_no_dropout(mode: str, fused: bool) -> float:
    s, b, h, a = S, B, GPT2.d_model, GPT2.n_heads
    if mode == "full":
        return 4 * s * b * h
    if mode == "selective" or fused:
        return 64 * s * b * h
    return s * b * h * (64 + 4 * a * s / h)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("mode", ["none", "selective", "full"])
def test_layer_activation_bytes_match_formula(mode, fused):
    peak, live_after = layer_bytes(mode, fused)
    assert peak == pytest.approx(korthikanti_fp32_no_dropout(mode, fused), rel=0.15)
    assert live_after == 0  # everything saved was released with the graph


@pytest.mark.parametrize("mode", ["none", "selective", "full"])
def test_llama_layer_activation_bytes_match_perfmodel(mode):
    peak, live_after = layer_bytes(mode, True, LLAMA)
    rope_tables = 0 if mode == "full" else 2 * S * LLAMA.head_dim // 2 * 4  # cos, sin [S, hd/2] fp32
    assert peak == sum(layer_activation_terms(LLAMA, S, B, recompute=mode, dtype_bytes=4).values()) + rope_tables
    assert live_after == 0


def test_meter_counts_shared_storage_once_and_tracks_peak_across_microbatches():
    w = torch.randn(64, 64, requires_grad=True)
    with ActivationMeter() as meter:
        x = torch.randn(8, 64)
        y1 = (x @ w).relu()  # saves x (2 KiB; w itself is not needed: x takes no gradient) and the relu output
        first = meter.live
        y2 = (x @ w).relu()  # x again: same storage, not counted twice
    assert first == 2 * 8 * 64 * 4
    assert meter.live == first + 8 * 64 * 4
    y1.sum().backward()
    assert meter.live == 2 * 8 * 64 * 4  # y2's graph still holds x and its relu output
    y2.sum().backward()
    assert meter.live == 0 and meter.peak == 3 * 8 * 64 * 4


def test_full_recompute_meter_reports_the_rematerialized_block():
    """What each rerun of a fully recomputed Block keeps for its backward: one Block's activations
    (perfmodel's `working` term), reported only while a sink is set."""
    model = build(LLAMA)
    meter = recompute.RecomputeMeter()
    recompute.apply(model, Plan(recompute="full"), meter)
    materialize(model, LLAMA, 0, torch.device("cpu"))
    rope = model.rope(torch.arange(S))
    reported: list[int] = []
    for sink in (None, reported.append):
        meter.sink = sink
        x = torch.randn(B, S, LLAMA.d_model, requires_grad=True)  # [B, S, h]
        model.layers["1"](model.layers["0"](x, rope), rope).sum().backward()
    assert len(reported) == 2  # one rerun per Block, only on the metered pass
    full_block = layer_activation_bytes(LLAMA, S, B, dtype_bytes=4)
    for nbytes in reported:  # early stop leaves the last op's inputs referenced too: within 10%
        assert nbytes == pytest.approx(full_block, rel=0.10)
