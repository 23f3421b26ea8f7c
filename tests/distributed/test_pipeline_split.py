"""The pipeline stage split: balanced by cost (embedding and head count), divisibility errors,
explicit layouts, each rank building only its chunks on the meta device."""
from __future__ import annotations

import pytest
import torch

from axon.model import GPT
from launch.grid import Grid
from parallel.pipeline import apply, split_layers
from perfmodel.specs import ModelSpec, Plan, PlanError

SPEC = ModelSpec(n_layers=8, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, vocab_size=64)


def test_cheap_head_gives_equal_chunks():
    assert [len(r) for r in split_layers(SPEC, 4, seq_len=8)] == [2, 2, 2, 2]


def test_expensive_head_and_embedding_take_layers_off_the_ends():
    big_vocab = ModelSpec(n_layers=8, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, vocab_size=4096)
    sizes = [len(r) for r in split_layers(big_vocab, 4, seq_len=8)]
    assert sum(sizes) == 8 and sizes[-1] < 2 and sizes[0] <= sizes[1]
    bounds = split_layers(big_vocab, 4, seq_len=8)
    assert [r.start for r in bounds[1:]] == [r.stop for r in bounds[:-1]]  # consecutive


def test_indivisible_layers_split_unevenly_by_cost():
    sizes = [len(r) for r in split_layers(SPEC, 3, seq_len=8)]
    assert sum(sizes) == 8 and min(sizes) >= 2 and max(sizes) == 3
    seven = [len(r) for r in split_layers(ModelSpec(n_layers=7, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64,
                                                    vocab_size=64), 4, seq_len=8)]
    assert sum(seven) == 7 and min(seven) >= 1 and max(seven) == 2
    big = ModelSpec(n_layers=126, d_model=128, n_heads=4, n_kv_heads=2, d_ff=344, vocab_size=4096)
    sizes = [len(r) for r in split_layers(big, 16, seq_len=64)]
    assert sum(sizes) == 126 and min(sizes) >= 1 and sizes[-1] <= sizes[len(sizes) // 2]  # the head is costly
    with pytest.raises(PlanError, match="model.n_layers=8 is fewer than the 9 pipeline chunks"):
        split_layers(SPEC, 9, seq_len=8)


def test_explicit_layout():
    assert [list(r) for r in split_layers(SPEC, 3, seq_len=8, layout=[2, 3, 3])] == [[0, 1], [2, 3, 4], [5, 6, 7]]
    with pytest.raises(PlanError, match="summing to model.n_layers=8"):
        split_layers(SPEC, 3, seq_len=8, layout=[2, 3, 2])


@pytest.mark.parametrize("schedule,rank,chunks", [("1f1b", 1, [1]), ("interleaved", 1, [1, 3]), ("zbv", 0, [0, 3]),
                                                  ("zbv", 1, [1, 2])])
def test_each_rank_builds_only_its_chunks_on_meta(schedule, rank, chunks):
    plan = Plan(pp=2, schedule=schedule, virtual_stages=1 if schedule == "1f1b" else 2)
    grid = Grid.build(plan, rank, 2, create_groups=False)
    pipe = apply(SPEC, plan, grid, lambda ids, emb, head: GPT(SPEC, ids, emb, head), seq_len=8)
    assert sorted(pipe.chunks) == chunks
    assert all(p.is_meta for p in pipe.named_parameters().values())
    assert ("tok_emb.weight" in pipe.named_parameters()) == (0 in chunks)
    assert ("head.weight" in pipe.named_parameters()) == (len(pipe.layers) - 1 in chunks)


def test_wrong_virtual_stages_for_a_v_schedule_names_the_setting():
    plan = Plan(pp=2, schedule="zbv", virtual_stages=1)
    grid = Grid.build(plan, 0, 2, create_groups=False)
    with pytest.raises(PlanError, match="parallel.virtual_stages=2"):
        apply(SPEC, plan, grid, lambda ids, emb, head: GPT(SPEC, ids, emb, head), seq_len=8)


def test_tied_embeddings_across_chunks_is_rejected():
    tied = ModelSpec(n_layers=8, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, vocab_size=64, tied_embeddings=True)
    plan = Plan(pp=2, schedule="1f1b")
    with pytest.raises(PlanError, match="tied_embeddings"):
        apply(tied, plan, Grid.build(plan, 0, 2, create_groups=False), lambda *a: torch.nn.Identity(), seq_len=8)
