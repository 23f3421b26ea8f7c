"""The model family and its layout-independent initialization."""
from __future__ import annotations

import pytest
import torch

from axon import init as axinit
from axon.init import Shard, materialize, normal_shard
from axon.model import attention_core, build
from perfmodel.flops import n_params
from perfmodel.specs import ModelSpec

VARIANTS = [ModelSpec(n_layers=2),
            ModelSpec(n_layers=2, norm="layernorm", pos="learned", mlp="gelu", tied_embeddings=True, bias=True,
                      n_kv_heads=4)]


@pytest.mark.parametrize("spec", VARIANTS, ids=["llama", "gpt2"])
def test_build_materialize_forward_and_param_count(spec):
    model = build(spec)
    assert all(p.is_meta for p in model.parameters())
    materialize(model, spec, seed=1, device=torch.device("cpu"))
    assert sum(p.numel() for p in model.parameters()) == n_params(spec)
    logits = model(torch.randint(0, spec.vocab_size, (2, 16)))
    assert logits.shape == (2, 16, spec.vocab_size) and torch.isfinite(logits).all()


def test_init_is_independent_of_sharding(monkeypatch):
    full = normal_shard("w", (96, 40), Shard(), 0.02, seed=5)
    assert full.shape == (96, 40)
    assert torch.equal(normal_shard("w", (96, 40), Shard(slice(24, 48), slice(10, 30)), 0.02, 5), full[24:48, 10:30])
    flat = normal_shard("w", (96, 40), Shard(slice(0, 48), slice(0, 20), flat=slice(240, 480)), 0.02, 5)
    assert torch.equal(flat, full[0:48, 0:20].reshape(-1)[240:480])
    monkeypatch.setattr(axinit, "BLOCK_ELEMS", 200)  # several generator blocks: still only a shard is made
    part = normal_shard("w", (96, 40), Shard(slice(30, 31)), 0.02, 5)
    assert part.shape == (1, 40)
    assert not torch.equal(normal_shard("v", (96, 40), Shard(), 0.02, 5), full)  # names seed differently


def test_same_values_for_a_pipeline_piece():
    spec = ModelSpec(n_layers=4)
    whole, piece = build(spec), build(spec, layer_ids=range(2, 4), has_embedding=False)
    materialize(whole, spec, 7, torch.device("cpu"))
    materialize(piece, spec, 7, torch.device("cpu"))
    w = dict(whole.named_parameters())
    for name, p in piece.named_parameters():
        assert torch.equal(p, w[name]), name


def test_gqa_core_equals_repeated_heads():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 8, 4, 16), torch.randn(2, 8, 2, 16), torch.randn(2, 8, 2, 16)
    out = attention_core(q, k, v)
    ref = attention_core(q, k.repeat_interleave(2, dim=2), v.repeat_interleave(2, dim=2))
    torch.testing.assert_close(out, ref)
    # causal: the first position attends only to itself
    torch.testing.assert_close(out[:, 0], v.repeat_interleave(2, dim=2)[:, 0])
