"""GPT/Llama-family decoder: RMSNorm or LayerNorm, RoPE or learned positions, SwiGLU or GELU
MLP, grouped-query attention, tied or untied embeddings.

Built on the meta device and materialized by `axon.init.materialize`. Parallelism is applied
from outside (by module name); nothing here depends on sharded shapes: head counts are read
from tensor sizes (`view(B, S, -1, head_dim)`), so a tensor-parallel shard runs the same code.
Layers live in a ModuleDict keyed by their global index, so parameter names are the same for
every pipeline split (checkpoints stay layout-independent).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from perfmodel.specs import ModelSpec


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def make_norm(spec: ModelSpec) -> nn.Module:
    if spec.norm == "rmsnorm":
        return RMSNorm(spec.d_model, spec.norm_eps)
    return nn.LayerNorm(spec.d_model, eps=spec.norm_eps, bias=spec.bias)


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [S, head_dim/2] for global `positions` [S] (kept global under context parallelism)."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    ang = positions.float()[:, None] * inv[None, :]  # [S, hd/2]
    return ang.cos(), ang.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, S, H, hd] rotated pairwise (interleaved pairs, as in Meta's Llama)."""
    xf = x.float().reshape(*x.shape[:-1], -1, 2)  # [B, S, H, hd/2, 2]
    x0, x1 = xf[..., 0], xf[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    out = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1)
    return out.flatten(-2).to(x.dtype)


def attention_core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention. q [B, S, Hq, hd], k/v [B, S, Hkv, hd] -> [B, S, Hq, hd]."""
    rep = q.shape[2] // k.shape[2]
    if rep > 1:  # grouped-query attention: each kv head serves `rep` query heads
        k = k.repeat_interleave(rep, dim=2)
        v = v.repeat_interleave(rep, dim=2)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
    return out.transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        hd, kv = spec.head_dim, spec.n_kv_heads * spec.head_dim
        self.head_dim = hd
        self.wq = nn.Linear(spec.d_model, spec.d_model, bias=spec.bias)
        self.wk = nn.Linear(spec.d_model, kv, bias=spec.bias)
        self.wv = nn.Linear(spec.d_model, kv, bias=spec.bias)
        self.wo = nn.Linear(spec.d_model, spec.d_model, bias=spec.bias)
        self.core = attention_core  # replaced by context parallelism / recomputation wrappers

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        B, S = x.shape[:2]
        q = self.wq(x).view(B, S, -1, self.head_dim)  # [B, S, Hq, hd]
        k = self.wk(x).view(B, S, -1, self.head_dim)  # [B, S, Hkv, hd]
        v = self.wv(x).view(B, S, -1, self.head_dim)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        y = self.core(q, k, v).reshape(B, S, -1)  # [B, S, Hq*hd]
        return self.wo(y)


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.swiglu = spec.mlp == "swiglu"
        if self.swiglu:
            self.w_gate = nn.Linear(spec.d_model, spec.d_ff, bias=spec.bias)
        self.w_up = nn.Linear(spec.d_model, spec.d_ff, bias=spec.bias)
        self.w_down = nn.Linear(spec.d_ff, spec.d_model, bias=spec.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))
        return self.w_down(F.gelu(self.w_up(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.attn_norm = make_norm(spec)
        self.attn = Attention(spec)
        self.mlp_norm = make_norm(spec)
        self.mlp = MLP(spec)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), rope)
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
                self.head = nn.Linear(spec.d_model, spec.vocab_size, bias=False)

    def embed(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """tokens [B, S] -> hidden [B, S, h]."""
        x = self.tok_emb(tokens)
        if self.spec.pos == "learned":
            x = x + self.pos_emb(positions)[None]
        return x

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.spec.pos != "rope":
            return None
        return rope_tables(positions, self.spec.head_dim, self.spec.rope_theta)

    def blocks(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        rope = self.rope(positions)
        for layer in self.layers.values():
            x = layer(x, rope)
        return x

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """hidden [B, S, h] -> logits [B, S, V]."""
        x = self.norm(x)
        if self.spec.tied_embeddings:
            return F.linear(x, self.tok_emb.weight)
        return self.head(x)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [B, S] (global positions [S], default 0..S-1) -> logits [B, S, V]."""
        if positions is None:
            positions = torch.arange(tokens.shape[1], device=tokens.device)
        return self.logits(self.blocks(self.embed(tokens, positions), positions))


def build(spec: ModelSpec, **kwargs) -> GPT:
    """The model on the meta device (no memory); see axon.init.materialize."""
    with torch.device("meta"):
        return GPT(spec, **kwargs)
