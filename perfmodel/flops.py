"""Parameter count and model FLOPs (DESIGN.md section 4); the trainer's MFU uses these too."""
from __future__ import annotations

from perfmodel.specs import ModelSpec


def layer_params(m: ModelSpec) -> int:
    """Parameters of one transformer block (attention + MLP + two norms)."""
    kv = m.n_kv_heads * m.head_dim
    attn = m.d_model * m.d_model * 2 + m.d_model * kv * 2  # q, out, k, v
    mlp = (3 if m.mlp == "swiglu" else 2) * m.d_model * m.d_ff
    norm = (2 if m.norm == "layernorm" else 1) * m.d_model * 2
    bias = (m.d_model * 2 + kv * 2 + m.d_ff * (2 if m.mlp == "swiglu" else 1) + m.d_model) if m.bias else 0
    return attn + mlp + norm + bias


def n_params(m: ModelSpec) -> int:
    """All parameters, embeddings included."""
    emb = m.vocab_size * m.d_model
    head = 0 if m.tied_embeddings else m.vocab_size * m.d_model
    pos = m.max_seq_len * m.d_model if m.pos == "learned" else 0
    final_norm = (2 if m.norm == "layernorm" else 1) * m.d_model
    return m.n_layers * layer_params(m) + emb + head + pos + final_norm


def dense_params(m: ModelSpec) -> int:
    """Parameters that take part in matmuls (the embedding lookup and norms excluded; the head included)."""
    kv = m.n_kv_heads * m.head_dim
    per_layer = m.d_model * m.d_model * 2 + m.d_model * kv * 2 + (3 if m.mlp == "swiglu" else 2) * m.d_model * m.d_ff
    return m.n_layers * per_layer + m.vocab_size * m.d_model


def flops_per_token(m: ModelSpec, seq_len: int) -> float:
    """Useful training FLOPs per token: 6 * Psi_dense + 6 * L * h * s (causal attention)."""
    return 6.0 * dense_params(m) + 6.0 * m.n_layers * m.d_model * seq_len


def mfu(m: ModelSpec, seq_len: int, tokens_per_s: float, devices: int, peak_flops: float) -> float:
    """Model FLOPs utilization: achieved model FLOP/s over the devices' peak."""
    return flops_per_token(m, seq_len) * tokens_per_s / (devices * peak_flops)
