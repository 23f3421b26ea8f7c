"""The pipeline layer split, balanced by cost: the one home of which layers each chunk holds, read by
the runtime (parallel/pipeline.py builds the chunks) and by the performance model (layers and
parameters of the most loaded stage). Standard library only.

    split_layers(spec, n_chunks, seq_len, micro_batch_size)  -> [range(0, 2), range(2, 4), ...]
    stage_layers(spec, pp, seq_len)                          -> layers of the most loaded stage
    rank_loads(spec, pp, seq_len, schedule, virtual_stages)  -> what each pipeline rank holds

Chunks hold consecutive layers, at least one each (so any n_layers >= chunks splits, 126 over 16
included); the split minimizes the most expensive chunk, counting forward FLOPs per token of each
layer, of the output head (2 h V, on the last chunk) and of the embedding (its dense gradient,
V h per microbatch spread over the microbatch's tokens, on the first chunk).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

from perfmodel import flops
from perfmodel.schedules import placement
from perfmodel.specs import ModelSpec, PlanError


def chunk_costs(spec: ModelSpec, tokens_per_microbatch: int, seq_len: int) -> tuple[float, float, float]:
    """Forward FLOPs per token of one layer, the embedding and the head."""
    layer = flops.layer_gemm_flops(spec) + flops.attention_flops(spec, seq_len)
    embedding = spec.vocab_size * spec.d_model / max(tokens_per_microbatch, 1)  # the lookup's gradient scatter
    return layer, embedding, flops.head_flops(spec)


def _explicit(L: int, n_chunks: int, layout: Sequence[int]) -> list[range]:
    if len(layout) != n_chunks or sum(layout) != L or min(layout) < 0:
        raise PlanError(f"pipeline layout {list(layout)} must give {n_chunks} non-negative layer counts "
                        f"(parallel.pp * chunks per rank) summing to model.n_layers={L}")
    starts = [sum(layout[:c]) for c in range(n_chunks)]
    return [range(s, s + n) for s, n in zip(starts, layout)]


def split_layers(spec: ModelSpec, n_chunks: int, seq_len: int, micro_batch_size: int = 1,
                 layout: Sequence[int] | None = None) -> list[range]:
    """Consecutive layer ranges, one per chunk (>= 1 layer each), minimizing the most expensive
    chunk; an explicit `layout` (layers per chunk) is taken as given."""
    if layout is not None:
        return _explicit(spec.n_layers, n_chunks, layout)
    return list(_balanced(spec, n_chunks, seq_len, micro_batch_size))


@lru_cache(maxsize=4096)
def _balanced(spec: ModelSpec, n_chunks: int, seq_len: int, micro_batch_size: int) -> tuple[range, ...]:
    L = spec.n_layers
    if L < n_chunks:
        raise PlanError(f"model.n_layers={L} is fewer than the {n_chunks} pipeline chunks (parallel.pp * chunks "
                        f"per rank); each chunk needs a layer: lower parallel.pp / parallel.virtual_stages")
    layer, embedding, head = chunk_costs(spec, micro_batch_size * seq_len, seq_len)
    inf = float("inf")
    # best[c][i]: the smallest max chunk cost placing layers [0, i) into chunks [0, c), each non-empty
    best = [[inf] * (L + 1) for _ in range(n_chunks + 1)]
    cut = [[0] * (L + 1) for _ in range(n_chunks + 1)]
    best[0][0] = 0.0
    for c in range(1, n_chunks + 1):
        extra = (embedding if c == 1 else 0.0) + (head if c == n_chunks else 0.0)
        prev, here, cuts = best[c - 1], best[c], cut[c]
        for i in range(c, L - (n_chunks - c) + 1):
            for j in range(_first_cut(prev, c - 1, i, layer, extra), i):
                if prev[j] >= here[i] - 1e-9 * layer:
                    break  # prev never decreases with j: no later cut can do better
                cost = max(prev[j], (i - j) * layer + extra)
                if cost < here[i] - 1e-9 * layer:  # ties: keep the earliest cut (more layers later)
                    here[i], cuts[i] = cost, j
    bounds, i = [], L
    for c in range(n_chunks, 0, -1):
        bounds.append(range(cut[c][i], i))
        i = cut[c][i]
    return tuple(bounds[::-1])


def _first_cut(prev: list[float], lo: int, i: int, layer: float, extra: float) -> int:
    """Where `_balanced`'s scan of the last chunk's start j in [lo, i) may begin: one before the
    first j at which the chunks before it (prev[j], never decreasing in j) cost at least the last
    chunk ((i - j) layers + extra, falling by a layer per step). Every earlier j costs the last
    chunk's alone, each a layer more than the next, so the scan from there keeps the same cut."""
    first, hi = lo, i - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if prev[mid] >= (i - mid) * layer + extra:
            hi = mid
        else:
            lo = mid + 1
    return max(lo - 1, first)


@lru_cache(maxsize=4096)
def stage_layers(spec: ModelSpec, pp: int, seq_len: int) -> int:
    """Layers of the most loaded of `pp` pipeline stages, one chunk each: the unit of a stage's
    activations (perfmodel/memory.py `stage_activation_bytes`, pipeline.py); what a rank holds
    under a schedule's chunk placement, for its parameters and its time, is `rank_loads`."""
    if pp <= 1:
        return spec.n_layers
    return max(len(r) for r in _balanced(spec, pp, seq_len, 1))


@dataclass(frozen=True)
class RankLoad:
    """What one pipeline rank holds over all its chunks."""

    layers: int  # Blocks
    embedding: bool  # the first chunk's embedding (and learned positions)
    head: bool  # the last chunk's final norm and output head (and the loss)


@lru_cache(maxsize=4096)
def rank_loads(spec: ModelSpec, pp: int, seq_len: int, schedule: str = "1f1b", virtual_stages: int = 1
               ) -> tuple[RankLoad, ...]:
    """Each pipeline rank's load, as the runtime places it (parallel/pipeline.py): the schedule's
    chunks split by cost (`split_layers`, at one sequence per microbatch) and placed on ranks by
    `schedules.placement` (round robin, or V-shaped with the first and the last chunk on rank 0),
    the embedding with the first chunk and the head with the last. Memory (perfmodel/memory.py
    `stage_params`) and time (perfmodel/estimate.py `microbatch_costs`) both read it."""
    if pp <= 1:
        return (RankLoad(spec.n_layers, True, True),)
    place = placement(schedule, pp, virtual_stages)
    chunks = _balanced(spec, len(place), seq_len, 1)
    return tuple(RankLoad(sum(len(chunks[c]) for c, r in enumerate(place) if r == rank),
                          place[0] == rank, place[-1] == rank) for rank in range(pp))
