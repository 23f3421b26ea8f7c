"""GPT/Llama-family decoder: RMSNorm or LayerNorm, RoPE or learned positions, SwiGLU or GELU
MLP, grouped-query attention, tied or untied embeddings.

Built on the meta device and materialized by `axon.init.materialize`. Parallelism is applied
from outside (by module name); nothing here depends on sharded shapes: head counts are read
from tensor sizes (`view(B, S, -1, head_dim)`), so a tensor-parallel shard runs the same code.
Layers live in a ModuleDict keyed by their global index, so parameter names are the same for
every pipeline split (checkpoints stay layout-independent). What a Block saves for backward, term
by term: docs/activation_memory.md.

Positions are either shared, [S] (one sequence layout for the batch: plain causal attention,
`is_causal`), or per sample, [B, S] (packed rows of several documents, axon/sft_data.py: each
document's positions restart at 0). With per-sample positions, RoPE / learned positions read each
token's own position and a token attends only to earlier tokens of its own document: token i's
document starts at index i - positions[i], so documents are told apart by that start
(kernels/flash_attention.py `document_mask`, for rows in natural order; the context-parallel
cores derive the same from the global indices of their shard, parallel/context.py).
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from perfmodel.specs import ModelSpec


class Linear(nn.Linear):
    """nn.Linear whose three GEMMs run in the layouts of `gemm_table` (kernels/gemm.py; set by
    `kernels.gemm.attach` when model.gemm_tuning is on; None: torch's own, bitwise F.linear)."""

    gemm_table = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.linear(x, self.weight, self.bias, self.gemm_table)  # [.., out]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, kind: str = "auto"):
        super().__init__()
        self.eps, self.kind = eps, kind
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.rms_norm(x, self.weight, self.eps, self.kind)  # [.., d]


def make_norm(spec: ModelSpec) -> nn.Module:
    if spec.norm == "rmsnorm":
        return RMSNorm(spec.d_model, spec.norm_eps, spec.kernels)
    return nn.LayerNorm(spec.d_model, eps=spec.norm_eps, bias=spec.bias)


def rope_inv_freq(spec: ModelSpec, device: torch.device | None = None) -> torch.Tensor:
    """Inverse frequencies [head_dim/2], with Llama 3.1 scaling when `spec.rope_scaling` is llama3
    (as transformers' `_compute_llama3_parameters`: long wavelengths divided by the factor, short
    ones kept, the band between interpolated)."""
    hd = spec.head_dim
    inv = 1.0 / (spec.rope_theta ** (torch.arange(0, hd, 2, device=device, dtype=torch.int64).float() / hd))
    if spec.rope_scaling != "llama3":
        return inv
    factor, low, high = spec.rope_factor, spec.rope_low_freq_factor, spec.rope_high_freq_factor
    old_len = spec.rope_original_max_len
    wavelen = 2 * math.pi / inv  # [hd/2]
    scaled = torch.where(wavelen > old_len / low, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
    return torch.where(medium, smoothed, scaled)


def rope_tables(positions: torch.Tensor, spec: ModelSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [S, head_dim/2] for global `positions` [S] (kept global under context parallelism),
    or [B, S, head_dim/2] for per-sample positions [B, S]."""
    inv = rope_inv_freq(spec, positions.device)  # [hd/2]
    ang = positions.float()[..., None] * inv  # [.., S, hd/2]
    return ang.cos(), ang.sin()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kind: str) -> torch.Tensor:
    """x [B, S, H, hd] rotated by cos/sin [S, hd/2] (shared) or [B, S, hd/2] (per sample: the
    kernel sees the batch as one sequence of B*S tokens, a view)."""
    if cos.dim() == 2:
        return kernels.rope(x, cos, sin, kind)
    B, S = x.shape[:2]
    flat = kernels.rope(x.reshape(1, B * S, *x.shape[2:]), cos.reshape(B * S, -1), sin.reshape(B * S, -1), kind)
    return flat.view(x.shape)  # [B, S, H, hd]


def attention_core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   positions: torch.Tensor | None = None, kind: str = "auto") -> torch.Tensor:
    """Causal attention. q [B, S, Hq, hd], k/v [B, S, Hkv, hd] -> [B, S, Hq, hd]. With per-sample
    `positions` [B, S] (packed rows), within each document only. `kind` (model.kernels) picks
    scaled_dot_product_attention (grouped K/V as they are where a fused kernel takes them) or the
    flash-attention Triton kernels (kernels/flash_attention.py; docs/activation_memory.md)."""
    return kernels.attention(q, k, v, positions, kind)


def projection_input(x: torch.Tensor) -> torch.Tensor:
    """x [.., h] as the projections reading it (q, k, v; gate, up) compute with: under autocast,
    one copy in the compute dtype shared by all of them. Autocast would cast x once per
    projection and each would save its own copy; the shared one is saved once, and the
    projections' input gradients are summed in the compute dtype before the cast back (as
    parallel/tensor.py's grouped projections and a fused QKV do). Without autocast: x itself."""
    device = x.device.type
    if not torch.is_autocast_enabled(device) or x.dtype == torch.float64:  # autocast leaves fp64 alone
        return x
    return x.to(torch.get_autocast_dtype(device))


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        hd, kv = spec.head_dim, spec.n_kv_heads * spec.head_dim
        self.head_dim, self.kernels = hd, spec.kernels
        self.wq = Linear(spec.d_model, spec.d_model, bias=spec.bias)
        self.wk = Linear(spec.d_model, kv, bias=spec.bias)
        self.wv = Linear(spec.d_model, kv, bias=spec.bias)
        self.wo = Linear(spec.d_model, spec.d_model, bias=spec.bias)
        # (q, k, v[, positions]) -> y; replaced by context parallelism / recomputation wrappers
        self.core = functools.partial(attention_core, kind=spec.kernels)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """`positions` [B, S]: per-sample positions of packed rows (attention within documents)."""
        x = projection_input(x)
        q = self.wq(x)  # [B, S, Hq*hd] (the whole sequence: under sequence parallelism x holds a shard)
        B, S = q.shape[:2]
        q = q.view(B, S, -1, self.head_dim)  # [B, S, Hq, hd]
        k = self.wk(x).view(B, S, -1, self.head_dim)  # [B, S, Hkv, hd]
        v = self.wv(x).view(B, S, -1, self.head_dim)
        if rope is not None:
            q, k = rotate(q, *rope, self.kernels), rotate(k, *rope, self.kernels)  # interleaved pairs
        y = self.core(q, k, v) if positions is None else self.core(q, k, v, positions)  # [B, S, Hq, hd]
        return self.wo(y.reshape(B, S, -1))  # [B, S, Hq*hd] in


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.swiglu, self.kernels = spec.mlp == "swiglu", spec.kernels
        if self.swiglu:
            self.w_gate = Linear(spec.d_model, spec.d_ff, bias=spec.bias)
        self.w_up = Linear(spec.d_model, spec.d_ff, bias=spec.bias)
        self.w_down = Linear(spec.d_ff, spec.d_model, bias=spec.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            x = projection_input(x)
            return self.w_down(kernels.swiglu(self.w_gate(x), self.w_up(x), self.kernels))  # [B, S, d]
        return self.w_down(F.gelu(self.w_up(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.attn_norm = make_norm(spec)
        self.attn = Attention(spec)
        self.mlp_norm = make_norm(spec)
        self.mlp = MLP(spec)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), rope, positions)
        return x + self.mlp(self.mlp_norm(x))


class GPT(nn.Module):
    """Decoder holding layers `layer_ids` (all by default; a pipeline stage holds a range).

    `has_embedding` / `has_head` say whether this piece holds the first / last parts.
    """

    def __init__(self, spec: ModelSpec, layer_ids: range | None = None,
                 has_embedding: bool = True, has_head: bool = True):
        super().__init__()
        self.spec = spec
        layer_ids = range(spec.n_layers) if layer_ids is None else layer_ids
        if has_embedding:
            self.tok_emb = nn.Embedding(spec.vocab_size, spec.d_model)
            if spec.pos == "learned":
                self.pos_emb = nn.Embedding(spec.max_seq_len, spec.d_model)
        self.layers = nn.ModuleDict({str(i): Block(spec) for i in layer_ids})
        if has_head:
            self.norm = make_norm(spec)
            if not spec.tied_embeddings:
                self.head = Linear(spec.d_model, spec.vocab_size, bias=False)

    def embed(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """tokens [B, S], positions [S] or [B, S] -> hidden [B, S, h]."""
        x = self.tok_emb(tokens)
        if self.spec.pos == "learned":
            pe = self.pos_emb(positions)  # [S, h] or [B, S, h]
            x = x + (pe[None] if positions.dim() == 1 else pe)
        return x

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.spec.pos != "rope":
            return None
        return rope_tables(positions, self.spec)

    def blocks(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """hidden [B, S, h], positions [S] (shared: causal) or [B, S] (packed: per document)."""
        rope = self.rope(positions)
        packed = positions if positions.dim() == 2 else None
        for layer in self.layers.values():
            x = layer(x, rope) if packed is None else layer(x, rope, packed)
        return x

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """hidden [B, S, h] -> logits [B, S, V]."""
        x = self.norm(x)
        if self.spec.tied_embeddings:
            return F.linear(x, self.tok_emb.weight)
        return self.head(x)

    def head_loss(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """hidden [B, S, h], targets [B, S] -> the summed cross-entropy of `logits(x)` over kept
        targets, the head matmul and the loss fused by token chunks (kernels/linear_ce.py): the
        [B, S, V] logits never exist whole. Call it where the logits would be computed (under the
        same autocast); an unsplit head only (a head split over tp_col fuses its rows with
        parallel/tensor.py `TPLinear.fused_loss`; parallel/head_loss.py chooses)."""
        weight = self.tok_emb.weight if self.spec.tied_embeddings else self.head.weight  # [V, h]
        return kernels.linear_cross_entropy(self.norm(x), weight, targets, self.spec.kernels)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [B, S] (global positions [S], default 0..S-1, or per-sample [B, S]) -> logits [B, S, V]."""
        if positions is None:
            positions = torch.arange(tokens.shape[1], device=tokens.device)
        return self.logits(self.blocks(self.embed(tokens, positions), positions))


def build(spec: ModelSpec, **kwargs) -> GPT:
    """The model on the meta device (no memory); see axon.init.materialize."""
    with torch.device("meta"):
        return GPT(spec, **kwargs)
