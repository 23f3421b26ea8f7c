"""What the performance model prices for other stacks' published runs (perfmodel/block_cost.py):
Float8 Linears (`Cluster.float8_linears`), AsyncTP (`Cluster.async_tp`) and the attention core's
own rate (`Cluster.attention_efficiency`); and that `axon train` refuses the first two, which its
trainer does not do (perfmodel/rules.py `training_cluster_rules`)."""
from dataclasses import replace

import pytest

from perfmodel import rules
from perfmodel.block_cost import block_compute, block_costs
from perfmodel.estimate import estimate
from perfmodel.specs import Cluster, ModelSpec, Plan, PlanError, RangeError

GPU = Cluster(gpus_per_node=8, peak_flops=1e15, hbm_bytes=1e12, compute_efficiency=0.5, gemm_half_dim=64.0,
              intra_bw=1e11, inter_bw=1e10, intra_lat=1e-5, inter_lat=1e-5, mem_bw=2e12, float8_speedup=1.5)
M = ModelSpec(n_layers=4, d_model=1024, n_heads=8, n_kv_heads=8, d_ff=4096, vocab_size=32000, max_seq_len=4096)
TP = Plan(tp_col=8, sequence_parallel=True, micro_batch_size=4)


def test_float8_speeds_the_block_linears_only():
    bf16, f8 = (block_compute(M, Plan(micro_batch_size=2), c, 2048) for c in (GPU, replace(GPU, float8_linears=True)))
    assert f8.gemm == pytest.approx(bf16.gemm / 1.5)
    assert (f8.attn, f8.head) == (bf16.attn, bf16.head)  # attention core and output head stay bf16
    assert block_compute(M, Plan(), replace(GPU, float8_speedup=3.0), 2048) == block_compute(M, Plan(), GPU, 2048)


def test_float8_speedup_below_one_is_refused():
    with pytest.raises(RangeError, match="cluster.float8_speedup=0.5"):
        Cluster(float8_speedup=0.5)


def test_attention_runs_at_its_fraction_of_the_gemm_rate():
    full, half = (block_compute(M, Plan(), c, 4096) for c in (GPU, replace(GPU, attention_efficiency=0.5)))
    assert half.attn == pytest.approx(2 * full.attn)
    assert (half.gemm, half.head) == (full.gemm, full.head)


def test_async_tp_hides_the_forward_collectives_behind_the_forward_gemms():
    vanilla, overlapped = (block_costs(M, TP, c, 2048) for c in (GPU, replace(GPU, async_tp=True)))
    assert vanilla.forward_ar > 0 and overlapped.forward_ar < vanilla.forward_ar
    assert overlapped.tensor < vanilla.tensor
    hidden = overlapped.hidden_fwd[("intra-node", "tp")]
    assert hidden + overlapped.forward_ar == pytest.approx(vanilla.forward_ar)
    assert hidden <= overlapped.compute.gemm + 1e-12  # at most behind the forward GEMMs


def test_async_tp_hides_nothing_without_compute_to_hide_behind_or_without_sequence_parallelism():
    slow_link = replace(GPU, intra_bw=1e6, async_tp=True)  # collectives far longer than the GEMMs
    vanilla, overlapped = block_costs(M, TP, replace(slow_link, async_tp=False), 2048), block_costs(M, TP, slow_link,
                                                                                                    2048)
    assert overlapped.forward_ar == pytest.approx(vanilla.forward_ar - overlapped.compute.gemm)
    no_sp = TP.replace(sequence_parallel=False)
    assert block_costs(M, no_sp, replace(GPU, async_tp=True), 2048) == block_costs(M, no_sp, GPU, 2048)


def test_async_tp_shortens_the_step_and_float8_more_where_compute_dominates():
    plan = Plan(dp=2, tp_col=8, sequence_parallel=True, micro_batch_size=4)
    base = estimate(M, plan, GPU, 16, 2048)
    assert estimate(M, plan, replace(GPU, async_tp=True), 16, 2048).step_time_s < base.step_time_s
    f8 = estimate(M, plan, replace(GPU, float8_linears=True), 16, 2048)
    assert base.step_time_s / 1.5 < f8.step_time_s < base.step_time_s  # the rest of the step is not sped up


def test_training_refuses_what_only_other_stacks_do():
    assert rules.training_cluster_rules(GPU) == []
    found = rules.training_cluster_rules(replace(GPU, float8_linears=True, async_tp=True))
    assert [v.knob for v in found] == ["cluster.float8_linears", "cluster.async_tp"]
    with pytest.raises(PlanError, match=r"cluster\.float8_linears=true .* set it to false"):
        rules.raise_if(found)
