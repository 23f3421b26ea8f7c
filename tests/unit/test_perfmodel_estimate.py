"""estimate(): the step-time composition against hand-computed values, and its JSON shape."""
import itertools
from dataclasses import replace

import pytest

from perfmodel.estimate import estimate
from perfmodel.flops import causal_flops_per_token, flops_per_token
from perfmodel.search import best_plan, search
from perfmodel.specs import Cluster, ModelSpec, Offload, Plan, PlanError

TINY = ModelSpec()  # 8 layers, d_model 128, 4 heads, 2 kv heads, d_ff 344, vocab 256
IDEAL = Cluster(gpus_per_node=8, peak_flops=1e12, hbm_bytes=1e12, compute_efficiency=1.0, gemm_half_dim=0.0,
                intra_bw=1e10, inter_bw=1e9, intra_lat=1e-5, inter_lat=1e-4, mem_bw=1e11, dtype_bytes=4,
                overhead_bytes=1e8)


def test_single_device_step_is_model_flops_over_peak():
    """Compute time is the causal work over peak; MFU counts the standard model FLOPs (12 L h s)."""
    e = estimate(TINY, Plan(micro_batch_size=4), IDEAL, global_batch_size=16, seq_len=128)
    compute = causal_flops_per_token(TINY, 128) * 16 * 128 / IDEAL.peak_flops
    assert e.breakdown["compute_s"] == pytest.approx(compute)
    assert e.step_time_s == pytest.approx(sum(e.breakdown.values()))
    model_flops = flops_per_token(TINY, 128) * 16 * 128
    assert e.mfu == pytest.approx(model_flops / IDEAL.peak_flops / e.step_time_s)
    assert e.tokens_per_s == pytest.approx(16 * 128 / e.step_time_s)


def test_mfu_counts_attention_as_palm_and_torchtitan_do():
    """6 N + 12 L h s per token (PaLM appendix B, torchtitan's get_num_flop_per_token), N the dense
    (non-embedding) matmul weights plus the output head: at 128K context the attention term is
    large and counting it halved would under-report MFU."""
    m = ModelSpec(n_layers=32, d_model=4096, n_heads=32, n_kv_heads=8, d_ff=14336, vocab_size=128256,
                  max_seq_len=131072)
    matmul = 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336) + 4096 * 128256
    s = 131072
    assert flops_per_token(m, s) == pytest.approx(6 * matmul + 12 * 32 * 4096 * s)
    assert causal_flops_per_token(m, s) == pytest.approx(6 * matmul + 6 * 32 * 4096 * s)
    assert flops_per_token(m, s) / causal_flops_per_token(m, s) > 1.4


def test_recompute_costs_a_forward():
    base = estimate(TINY, Plan(micro_batch_size=4), IDEAL, 16, 128)
    full = estimate(TINY, Plan(micro_batch_size=4, recompute="full"), IDEAL, 16, 128)
    head = 2 * 16 * 128 * TINY.vocab_size * TINY.d_model / IDEAL.peak_flops
    assert full.breakdown["recompute_s"] == pytest.approx((base.breakdown["compute_s"] - 3 * head) / 3)
    assert full.memory.activations < base.memory.activations


def test_block_overhead_is_paid_per_block_pass():
    """A fixed cost per Block forward + backward of each microbatch (+ a third of it per
    rematerialized Block under full recomputation), independent of the microbatch size."""
    slow = replace(IDEAL, block_overhead_s=1e-3)
    for mbs, recompute in ((1, "none"), (4, "none"), (2, "full")):
        plan = Plan(pp=2, micro_batch_size=mbs, recompute=recompute)
        base, e = estimate(TINY, plan, IDEAL, 16, 128), estimate(TINY, plan, slow, 16, 128)
        micro, layers = 16 // mbs, TINY.n_layers // 2
        assert e.breakdown["compute_s"] - base.breakdown["compute_s"] == pytest.approx(micro * layers * 1e-3)
        redo = micro * layers * 1e-3 / 3 if recompute == "full" else 0.0
        assert e.breakdown["recompute_s"] - base.breakdown["recompute_s"] == pytest.approx(redo)


def test_data_parallel_all_reduce_exposed_without_overlap():
    plan = Plan(dp=8, micro_batch_size=2, overlap_grad_reduce=False)
    e = estimate(TINY, plan, IDEAL, 16, 128)
    from perfmodel.flops import n_params

    grads = n_params(TINY) * 4  # fp32 gradients, all-reduced over 8 ranks inside the node
    # parallel/data.py's layout: a last bucket of 1 MiB, the other 4.8 MiB in buckets of at most
    # grads / 4 = 1.45 MiB: 1 + 4 all-reduces, one latency each
    assert grads / 2**20 == pytest.approx(5.79, abs=0.01)
    buckets = 5
    assert e.breakdown["grad_sync_s"] == pytest.approx(buckets * 2 * 7 * 1e-5 + 2 * 7 / 8 * grads / 1e10)
    hidden = estimate(TINY, plan.replace(overlap_grad_reduce=True), IDEAL, 16, 128)
    assert hidden.breakdown["grad_sync_s"] < e.breakdown["grad_sync_s"]


def test_pipeline_bubble_matches_schedule():
    plan = Plan(pp=2, dp=4, micro_batch_size=1)  # m = 16 / 4 = 4 microbatches
    e = estimate(TINY, plan, IDEAL, 16, 128)
    busy = sum(e.breakdown[k] for k in ("compute_s", "recompute_s", "tensor_comm_s", "context_comm_s",
                                         "pipeline_p2p_s", "offload_s"))
    assert e.pipeline.bubble_fraction == pytest.approx(1 / 5, abs=0.02) or e.pipeline.source == "table"
    assert e.breakdown["bubble_s"] == pytest.approx(busy * e.pipeline.bubble_fraction / (1 - e.pipeline.bubble_fraction))


def test_shared_processors_hide_the_bubble_and_overlap_nothing():
    # 8 ranks on 2 processors (a CPU run): while some ranks idle in the bubble the busy ones run up
    # to 4x faster, so the pipeline takes max(work, (work + bubble) / 4)
    plan = Plan(pp=4, dp=2, micro_batch_size=1)
    gpu = estimate(TINY, plan, IDEAL, 16, 128)
    work = gpu.step_time_s - gpu.breakdown["bubble_s"] - gpu.breakdown["grad_sync_s"] - gpu.breakdown["optimizer_s"]
    assert gpu.breakdown["bubble_s"] == pytest.approx(work * 3 / 8, rel=1e-3)  # (p-1)/m of the work, m = 8
    cpu = estimate(TINY, plan, replace(IDEAL, compute_units=2), 16, 128)
    assert cpu.breakdown["bubble_s"] == 0.0  # (1 + 3/8) / 4 < 1
    slow = estimate(TINY, plan.replace(pp=8, dp=1, micro_batch_size=16), replace(IDEAL, compute_units=4), 16, 128)
    work = slow.step_time_s - slow.breakdown["bubble_s"] - slow.breakdown["optimizer_s"]
    assert slow.breakdown["bubble_s"] == pytest.approx(work * (1 + 7) / 2 - work, rel=1e-3)  # m = 1: 7 idle slots
    # and nothing overlaps: the gradient all-reduce costs what it costs with overlap switched off
    shared = estimate(TINY, Plan(dp=8, micro_batch_size=2), replace(IDEAL, compute_units=2), 16, 128)
    serial = estimate(TINY, Plan(dp=8, micro_batch_size=2, overlap_grad_reduce=False), IDEAL, 16, 128)
    assert shared.breakdown["grad_sync_s"] == pytest.approx(serial.breakdown["grad_sync_s"])


def test_to_dict_shape():
    d = estimate(TINY, Plan(dp=2, tp_col=2, pp=2, zero=1), IDEAL, 16, 128).to_dict()
    assert {"plan", "n_params", "step_time_s", "tokens_per_s", "mfu", "memory", "breakdown"} <= set(d)
    assert {"params", "grads", "optimizer", "activations", "total"} <= set(d["memory"])
    assert Plan.from_dict(d["plan"]) == Plan(dp=2, tp_col=2, pp=2, zero=1)


def test_invalid_plans_name_the_setting():
    with pytest.raises(PlanError, match="virtual_stages=2"):
        estimate(TINY, Plan(pp=2, dp=4, schedule="zbv"), IDEAL, 16, 128)
    with pytest.raises(PlanError, match="parallel.dp"):
        estimate(TINY, Plan(dp=3), IDEAL, 16, 128)


def test_search_finds_the_brute_force_optimum():
    """The pruned search returns the fastest fitting plan of an exhaustive enumeration."""
    tight = Cluster(**{**IDEAL.__dict__, "hbm_bytes": 2.2e8, "host_bytes": 1e9})  # forces trade-offs
    cons = {"pp": 2, "cp": 1}
    best = None
    for dp, x, y, z in itertools.product((1, 2, 4), (1, 2), (1, 2), (1, 2)):
        if dp * x * y * z * 2 != 8:
            continue
        for zero, mbs, rec, opt, frac, (sched, v) in itertools.product(
                (0, 1, 2, 3), (1, 2, 4, 8, 16), ("none", "selective", "full"), (False, True), (0.0, 0.5, 1.0),
                (("1f1b", 1), ("gpipe", 1), ("zbh1", 1), ("interleaved", 2), ("interleaved", 4), ("zbv", 2),
                 ("vhalf", 2), ("vmin", 2))):
            plan = Plan(dp=dp, pp=2, tp_col=x, tp_row=y, tp_depth=z, zero=zero, micro_batch_size=mbs,
                        recompute=rec, offload=Offload(opt, frac), schedule=sched, virtual_stages=v,
                        sequence_parallel=x * y > 1)
            try:
                e = estimate(TINY, plan, tight, 16, 128)
            except PlanError:
                continue
            if e.fits and (best is None or e.step_time_s < best):
                best = e.step_time_s
    found = search(TINY, tight, 8, cons, 16, 128, top=3)
    assert best is not None and found.estimates
    assert found.estimates[0].step_time_s == pytest.approx(best, rel=1e-3)
    assert all(e.fits and e.plan.pp == 2 for e in found.estimates)


def test_best_plan_reports_when_nothing_fits():
    with pytest.raises(PlanError, match="fits"):
        best_plan(TINY, Cluster(**{**IDEAL.__dict__, "hbm_bytes": 1e6}), 8, {}, 16, 128)
