"""The software stack's compute efficiency (Cluster.stack) and the time side of a pipeline rank with
several chunks (perfmodel/split.py rank_loads, as the runtime places them)."""
from dataclasses import replace

import pytest

from axon.config import freeze, load
from perfmodel.block_cost import block_compute
from perfmodel.estimate import estimate, microbatch_costs, optimizer_time
from perfmodel.flops import layer_params
from perfmodel.memory import rank_params, stage_params
from perfmodel.specs import Cluster, ModelSpec, Plan, RangeError
from perfmodel.split import rank_loads, stage_layers

IDEAL = Cluster(gpus_per_node=8, peak_flops=1e12, hbm_bytes=1e12, compute_efficiency=0.5, eager_efficiency=0.2,
                gemm_half_dim=0.0, intra_bw=1e10, inter_bw=1e9, intra_lat=1e-5, inter_lat=1e-4, mem_bw=1e11,
                dtype_bytes=4, overhead_bytes=1e8)
# a wide vocabulary: the head weighs several Blocks, so where it sits decides the busiest rank
WIDE = ModelSpec(n_layers=8, d_model=128, n_heads=4, n_kv_heads=2, d_ff=344, vocab_size=32768)


def test_unknown_stack_is_one_line_naming_the_field_and_the_stacks():
    with pytest.raises(RangeError) as err:
        Cluster(stack="jit")
    assert str(err.value) == "cluster.stack='jit' is not one of fused, compiled, eager"
    with pytest.raises(RangeError, match=r"^cluster\.stack='jit' is not one of fused, compiled, eager$"):
        freeze(load(["cluster=dgx-h100", "cluster.stack=jit"]))


def test_stack_efficiencies_are_fractions_or_unset():
    for name in ("eager_efficiency", "compiled_efficiency"):
        with pytest.raises(RangeError, match=f"cluster.{name}=1.5"):
            Cluster(**{name: 1.5})
    for stack in ("eager", "compiled"):  # unset: one measured stack
        assert Cluster(compute_efficiency=0.4, stack=stack).efficiency == 0.4
    both = Cluster(compute_efficiency=0.5, compiled_efficiency=0.4, eager_efficiency=0.3)
    assert [replace(both, stack=s).efficiency for s in ("fused", "compiled", "eager")] == [0.5, 0.4, 0.3]


def test_eager_stack_prices_the_same_layout_slower_by_the_efficiency_ratio():
    """Same model, layout and cluster: the eager stack's compute takes compute_efficiency /
    eager_efficiency times the fused stack's (2.5x here); communication is unchanged."""
    plan = Plan(dp=2, micro_batch_size=2)
    fused = estimate(WIDE, plan, IDEAL, 8, 128)
    eager = estimate(WIDE, plan, replace(IDEAL, stack="eager"), 8, 128)
    assert eager.breakdown["compute_s"] == pytest.approx(2.5 * fused.breakdown["compute_s"])
    assert eager.breakdown["optimizer_s"] == pytest.approx(fused.breakdown["optimizer_s"])
    assert eager.step_time_s > 2 * fused.step_time_s


def test_gpu_presets_state_each_stacks_efficiency_and_local_cpu_keeps_its_number():
    h100 = freeze(load(["cluster=dgx-h100"])).cluster
    assert (h100.stack, h100.efficiency) == ("fused", 0.57)  # Axon's own runs: the fused stack
    assert replace(h100, stack="compiled").efficiency == 0.46
    eager = replace(h100, stack="eager")
    assert eager.efficiency == 0.39
    m = ModelSpec(n_layers=2, d_model=4096, n_heads=32, n_kv_heads=8, d_ff=14336, vocab_size=128256)
    fast, slow = (block_compute(m, Plan(), c, 8192) for c in (h100, eager))
    assert slow.gemm / fast.gemm == pytest.approx(0.57 / 0.39)
    cpu = freeze(load(["cluster=local-cpu"])).cluster
    assert cpu.efficiency == cpu.compute_efficiency == replace(cpu, stack="eager").efficiency
    assert cpu.attention_efficiency == 1.0  # its Block was measured as a whole


@pytest.mark.parametrize("schedule,v,holder", [("zbv", 2, 0), ("vhalf", 2, 0), ("interleaved", 2, 1)])
def test_rank_with_embedding_and_head_is_priced_with_its_real_load(schedule, v, holder):
    """V shapes put the first and the last chunk (embedding and head) on rank 0; interleaved puts
    the head on the last rank. The busiest rank's microbatch and the optimizer are priced with
    that rank's own Blocks, head and parameters, not with one pp-way chunk per rank."""
    plan = Plan(pp=2, schedule=schedule, virtual_stages=v)
    loads = rank_loads(WIDE, 2, 128, schedule, v)
    assert loads[holder].head and sum(load.layers for load in loads) == WIDE.n_layers
    bc = block_compute(WIDE, plan, IDEAL, 128)
    work = [load.layers * 3 * (bc.gemm + bc.attn) + (3 * bc.head if load.head else 0.0) for load in loads]
    assert max(work) == work[holder]  # the wide head makes its rank the busiest
    mb = microbatch_costs(WIDE, plan, IDEAL, 128, 4)
    assert (mb.layers, mb.head) == (loads[holder].layers, True)
    assert mb.compute == pytest.approx(work[holder])
    one_chunk = stage_layers(WIDE, 2, 128) * 3 * (bc.gemm + bc.attn) + 3 * bc.head  # the old pricing
    assert mb.compute != pytest.approx(one_chunk)
    e = estimate(WIDE, plan, IDEAL, 8, 128)
    assert e.breakdown["compute_s"] == pytest.approx(8 * work[holder])
    psi = max(rank_params(WIDE, load) for load in loads)
    assert psi == stage_params(WIDE, 2, 128, schedule, v) != stage_params(WIDE, 2, 128)
    if schedule != "interleaved":  # a V's rank 0, with the embedding and the head, has the most
        assert psi == rank_params(WIDE, loads[0]) and loads[0].embedding
    assert e.breakdown["optimizer_s"] == pytest.approx(optimizer_time(plan, IDEAL, psi))


def test_v_shape_rank_zero_holds_embedding_head_and_its_two_chunks():
    loads = rank_loads(WIDE, 2, 128, "zbv", 2)
    assert (loads[0].embedding, loads[0].head) == (True, True)
    assert (loads[1].embedding, loads[1].head) == (False, False)
    emb = head = WIDE.vocab_size * WIDE.d_model
    assert rank_params(WIDE, loads[0]) == loads[0].layers * layer_params(WIDE) + emb + head + WIDE.d_model


def _reference_split(L: int, n: int, layer: float, embedding: float, head: float) -> tuple[range, ...]:
    """The plain O(n L^2) dynamic programme perfmodel/split.py `_balanced` used before its scan of
    the last chunk's start was narrowed: the narrowed one must give the same chunks."""
    inf = float("inf")
    best = [[inf] * (L + 1) for _ in range(n + 1)]
    cut = [[0] * (L + 1) for _ in range(n + 1)]
    best[0][0] = 0.0
    for c in range(1, n + 1):
        extra = (embedding if c == 1 else 0.0) + (head if c == n else 0.0)
        for i in range(c, L - (n - c) + 1):
            for j in range(c - 1, i):
                cost = max(best[c - 1][j], (i - j) * layer + extra)
                if cost < best[c][i] - 1e-9 * layer:
                    best[c][i], cut[c][i] = cost, j
    bounds, i = [], L
    for c in range(n, 0, -1):
        bounds.append(range(cut[c][i], i))
        i = cut[c][i]
    return tuple(bounds[::-1])


@pytest.mark.parametrize("costs", [(1.0, 0.0, 0.0), (1.0, 0.001, 0.6), (1.0, 0.3, 2.7), (3.0, 5.0, 0.0), (2.0, 2.0, 2.0)])
def test_balanced_split_matches_the_plain_dynamic_programme(costs, monkeypatch):
    from perfmodel import split
    monkeypatch.setattr(split, "chunk_costs", lambda spec, tokens, seq: costs)
    split._balanced.cache_clear()
    try:
        for L in (1, 2, 3, 5, 8, 13, 31, 64, 105, 126):
            for n in sorted({1, 2, 3, 4, 7, 8, max(1, L // 3), max(1, L // 2), max(1, L - 1), L}):
                if n <= L:
                    assert split._balanced(ModelSpec(n_layers=L), n, 128, 1) == _reference_split(L, n, *costs), (L, n)
    finally:
        split._balanced.cache_clear()
