"""Selective and full recomputation give the same gradients as no recomputation (bit for bit on
CPU: the rerun repeats the same kernels on the same inputs), for all layers or the first k, and
the rerun really happens (the attention core runs again in backward for each recomputed layer)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from axon.init import materialize
from axon.model import GPT, attention_core, build
from parallel import recompute
from perfmodel.specs import ModelSpec, Plan

SPEC = ModelSpec(n_layers=3, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, vocab_size=64, max_seq_len=16)


def grads(plan: Plan) -> tuple[dict[str, torch.Tensor], int]:
    """Gradients of one loss, and how many times the attention core ran."""
    model = build(SPEC)
    calls = []

    def counted_core(q, k, v):
        calls.append(1)
        return attention_core(q, k, v)

    for block in model.layers.values():
        block.attn.core = counted_core
    recompute.apply(model, plan)
    materialize(model, SPEC, 0, torch.device("cpu"))
    tokens = torch.randint(0, SPEC.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    logits = model(tokens[:, :-1])  # [2, 16, V]
    F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}, len(calls)


@pytest.mark.parametrize("mode,layers", [("selective", -1), ("full", -1), ("full", 2), ("selective", 1)])
def test_recompute_gives_identical_gradients(mode, layers):
    ref, ref_calls = grads(Plan())
    got, calls = grads(Plan(recompute=mode, recompute_layers=layers))
    assert got.keys() == ref.keys()
    for name in ref:
        assert torch.equal(got[name], ref[name]), name
    assert ref_calls == SPEC.n_layers
    assert calls == SPEC.n_layers + (SPEC.n_layers if layers < 0 else layers)


def stage_grads(plan: Plan) -> tuple[dict[str, torch.Tensor], int, list[str]]:
    """One stage of two chunks (layers 0-1 with the embedding, layer 2 with the head), recomputing
    per `plan` counted over the stage: gradients, attention core runs, recomputed layers."""
    with torch.device("meta"):
        chunks = [GPT(SPEC, range(0, 2), True, False), GPT(SPEC, range(2, 3), False, True)]
    calls, names = [], []

    def counted_core(q, k, v):
        calls.append(1)
        return attention_core(q, k, v)

    ks = recompute.per_chunk([len(c.layers) for c in chunks], plan.recompute_layers)
    for chunk, k in zip(chunks, ks):
        for block in chunk.layers.values():
            block.attn.core = counted_core
        names += recompute.apply(chunk, plan, layers=k)
        materialize(chunk, SPEC, 0, torch.device("cpu"))
    tokens = torch.randint(0, SPEC.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(16)
    x = chunks[0].blocks(chunks[0].embed(tokens[:, :-1], positions), positions)  # [2, 16, d]
    logits = chunks[1].logits(chunks[1].blocks(x, positions))  # [2, 16, V]
    F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
    return {n: p.grad.clone() for c in chunks for n, p in c.named_parameters()}, len(calls), names


def test_recompute_layers_count_per_stage_across_chunks():
    """recompute_layers=k on a stage of several chunks (interleaved / V schedules) recomputes the
    stage's first k Blocks in chunk order, k in all (what the performance model prices), not k
    per chunk; the gradients still equal no recomputation."""
    assert recompute.per_chunk([2, 1], 2) == [2, 0]
    assert recompute.per_chunk([2, 1], 3) == [2, 1]
    assert recompute.per_chunk([2, 1], -1) == [2, 1]
    ref, ref_calls, _ = stage_grads(Plan())
    got, calls, names = stage_grads(Plan(recompute="full", recompute_layers=2))
    assert names == ["layers.0", "layers.1"]
    assert ref_calls == SPEC.n_layers
    assert calls == SPEC.n_layers + 2
    assert got.keys() == ref.keys()
    for name in ref:
        assert torch.equal(got[name], ref[name]), name
