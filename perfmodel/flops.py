"""Parameter count and model FLOPs: the one home of the FLOPs formulas (docs/architecture.md).

Two counts, named apart: `flops_per_token` is the standard MFU convention (PaLM, Chowdhery et al.
2022, appendix B; torchtitan; Megatron-LM): 6 Psi_dense + 12 L h s per token, the attention
scores and values counted over the whole sequence even though a causal model skips half of
them; the trainer's and the performance model's MFU use it, so Axon's MFU compares with published
ones. `causal_flops_per_token` (6 Psi_dense + 6 L h s) is the work a causal kernel does; the
performance model's compute time and the pipeline's layer balancing use it (through
`attention_flops`)."""
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


def layer_matmul_params(m: ModelSpec) -> int:
    """Weights of one Block that take part in matmuls: q, k, v, out and the MLP."""
    kv = m.n_kv_heads * m.head_dim
    return m.d_model * m.d_model * 2 + m.d_model * kv * 2 + (3 if m.mlp == "swiglu" else 2) * m.d_model * m.d_ff


def layer_gemm_flops(m: ModelSpec) -> float:
    """Forward FLOPs per token of one Block's Linears."""
    return 2.0 * layer_matmul_params(m)


def attention_flops(m: ModelSpec, seq_len: int) -> float:
    """Forward FLOPs per token of one Block's causal attention core (QK^T and AV over half the
    sequence on average)."""
    return 2.0 * m.d_model * seq_len


def head_flops(m: ModelSpec) -> float:
    """Forward FLOPs per token of the output head."""
    return 2.0 * m.d_model * m.vocab_size


def causal_flops_per_token(m: ModelSpec, seq_len: int) -> float:
    """Training FLOPs per token a causal model does (forward + backward = 3 x forward):
    6 * Psi_dense + 6 * L * h * s."""
    return 3.0 * (m.n_layers * (layer_gemm_flops(m) + attention_flops(m, seq_len)) + head_flops(m))


def flops_per_token(m: ModelSpec, seq_len: int) -> float:
    """Model FLOPs per token in the standard MFU convention (PaLM / torchtitan / Megatron-LM):
    6 * Psi_dense + 12 * L * h * s (the attention core over the full sequence)."""
    return 3.0 * (m.n_layers * (layer_gemm_flops(m) + 2.0 * attention_flops(m, seq_len)) + head_flops(m))


def mfu(m: ModelSpec, seq_len: int, tokens_per_s: float, devices: int, peak_flops: float) -> float:
    """Model FLOPs utilization in the standard convention (`flops_per_token`): achieved model
    FLOP/s over the devices' peak."""
    return flops_per_token(m, seq_len) * tokens_per_s / (devices * peak_flops)
