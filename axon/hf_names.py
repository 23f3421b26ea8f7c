"""Parameter names and the RoPE row order between Hugging Face Llama and Axon.

    hf_name("layers.3.attn.wq.weight") == "model.layers.3.self_attn.q_proj.weight"
    hf_rows(spec, "layers.3.attn.wq.weight", 0, 32)   # HF rows holding Axon rows 0..31, or None

Axon's RoPE rotates interleaved pairs (x[2p], x[2p+1]) (Meta's convention); Hugging Face's q/k
projections are stored permuted for the rotate-half convention (pairs (x[p], x[p + hd/2])). So
Axon row h*hd + 2p + c of wq / wk is HF row h*hd + c*hd/2 + p (the inverse of the permutation
transformers' convert_llama_weights_to_hf.py applies). The permutation stays inside each head.
"""
from __future__ import annotations

import re
from typing import Optional

import torch

from perfmodel.specs import ModelSpec

_LAYER = {  # Axon name inside a Block -> HF name inside a decoder layer
    "attn.wq.weight": "self_attn.q_proj.weight", "attn.wk.weight": "self_attn.k_proj.weight",
    "attn.wv.weight": "self_attn.v_proj.weight", "attn.wo.weight": "self_attn.o_proj.weight",
    "mlp.w_gate.weight": "mlp.gate_proj.weight", "mlp.w_up.weight": "mlp.up_proj.weight",
    "mlp.w_down.weight": "mlp.down_proj.weight", "attn_norm.weight": "input_layernorm.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
}
_TOP = {"tok_emb.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
        "head.weight": "lm_head.weight"}


def hf_name(name: str) -> str:
    """The Hugging Face name of Axon parameter `name`."""
    if name in _TOP:
        return _TOP[name]
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    if m and m.group(2) in _LAYER:
        return f"model.layers.{m.group(1)}.{_LAYER[m.group(2)]}"
    raise ValueError(f"parameter {name} has no Hugging Face Llama counterpart; only Llama-shaped models "
                     f"(rmsnorm, rope, swiglu, no bias) convert")


def rope_heads(spec: ModelSpec, name: str) -> Optional[int]:
    """Heads of a RoPE-permuted projection (wq: n_heads, wk: n_kv_heads), None for the rest."""
    if spec.pos != "rope":
        return None
    if name.endswith("attn.wq.weight"):
        return spec.n_heads
    if name.endswith("attn.wk.weight"):
        return spec.n_kv_heads
    return None


def hf_rows(spec: ModelSpec, name: str, r0: int, r1: int) -> Optional[torch.Tensor]:
    """HF row indices [r1 - r0] holding Axon rows r0..r1-1 of `name`; None when rows are not permuted."""
    if rope_heads(spec, name) is None:
        return None
    hd = spec.head_dim
    i = torch.arange(r0, r1)  # Axon rows: head h, pair p, component c
    h, j = i // hd, i % hd
    return h * hd + (j % 2) * (hd // 2) + j // 2


def to_hf_rows(spec: ModelSpec, name: str, w: torch.Tensor) -> torch.Tensor:
    """A whole Axon tensor [rows, ...] in Hugging Face row order."""
    idx = hf_rows(spec, name, 0, w.shape[0])
    if idx is None:
        return w
    out = torch.empty_like(w)
    out[idx] = w
    return out
