"""Memory formulas against the ZeRO paper and Korthikanti et al. (hand-computed values)."""
from dataclasses import replace

import pytest

from perfmodel import pipeline
from perfmodel.flops import layer_params, n_params
from perfmodel.memory import (activation_parts, combine_activations, layer_activation_bytes, model_states,
                              stage_params)
from perfmodel.pipeline import ScheduleCost
from perfmodel.specs import ModelSpec, Plan
from tests.unit.schedule_grid import grid

# GPT-style block (MHA, GELU MLP of 4h, LayerNorm): the shape the published formulas assume
GPT = ModelSpec(n_layers=4, d_model=1024, n_heads=16, n_kv_heads=16, d_ff=4096, vocab_size=1000,
                norm="layernorm", mlp="gelu", max_seq_len=2048)
S, B, H, A = 2048, 2, 1024, 16


@pytest.mark.parametrize("zero,expected_gb", [(0, 135.0), (1, 46.4), (2, 16.9), (3, 2.1)])
def test_zero_model_states_as_the_runtime_keeps_them(zero, expected_gb):
    # the ZeRO paper's Figure 1 model (7.5B parameters, N_d = 64) in the runtime's mixed precision
    # (parallel/zero.py): bf16 compute weights (2), fp32 master (4) sharded with Adam m, v (8) from
    # stage 1, fp32 gradients (4): 18 / 6 + 12/d / 2 + 16/d / 18/d bytes per parameter. The paper's
    # 120 / 31.4 / 16.6 / 1.9 GB keep 16-bit gradients (2 + 14/d at stage 2)
    total = sum(model_states(7.5e9, 64, zero, dtype_bytes=2))
    assert total / 1e9 == pytest.approx(expected_gb, abs=0.05)


def test_optimizer_offload_and_fp32():
    params, grads, opt = model_states(1e9, 4, 1, dtype_bytes=2, offload_optimizer=True)
    assert (params, grads, opt) == (2e9 + 4e9 / 4, 4e9, 0.0)  # bf16 weights, my fp32 master shard
    # fp32 training: 4 (weights) + 4 (grads) + 8 (Adam m, v; no master copy) = 16 bytes per parameter
    assert sum(model_states(1e9, 1, 0, dtype_bytes=4)) == 16e9


def kor(**kw):
    return layer_activation_bytes(GPT, S, B, flash=False, dropout=True, dtype_bytes=2, **kw)


def test_korthikanti_no_parallelism():
    assert kor() == pytest.approx(S * B * H * (34 + 5 * A * S / H))


@pytest.mark.parametrize("t", [2, 4, 8])
def test_korthikanti_tensor_parallel(t):
    sbh = S * B * H
    assert kor(tp_col=t) == pytest.approx(sbh * (10 + 24 / t + 5 * A * S / (H * t)))
    assert kor(tp_col=t, recompute="selective") == pytest.approx(sbh * (10 + 24 / t))
    assert kor(tp_col=t, recompute="full") == pytest.approx(2 * sbh)
    # SP: the paper's (sbh/t)(34 + 5as/h): the attention / MLP inputs saved as their sequence shard
    # and re-gathered in backward, as our runtime does (parallel/tensor_group.py `Projections`)
    assert kor(tp_col=t, sequence_parallel=True) == pytest.approx(sbh / t * (34 + 5 * A * S / H))
    assert kor(tp_col=t, sequence_parallel=True, recompute="selective") == pytest.approx(sbh * 34 / t)
    assert kor(tp_col=t, sequence_parallel=True, recompute="full") == pytest.approx(2 * sbh / t)


def test_flash_attention_drops_the_score_term_and_3d_splits():
    sbh = S * B * H
    no_dropout = layer_activation_bytes(GPT, S, B, dtype_bytes=2)  # flash, no dropout: 8 + 24
    assert no_dropout == pytest.approx(32 * sbh)
    # 3D: the residual region splits over tp_row (and the sequence over tp_col with SP, the
    # projection inputs included: saved as their shard, re-gathered in backward); heads and the MLP
    # interior over tp_col only (parallel/tensor.py computes them redundantly over tp_row)
    assert layer_activation_bytes(GPT, S, B, tp_col=2, tp_row=4) == pytest.approx(sbh * (8 / 4 + 24 / 2))
    assert layer_activation_bytes(GPT, S, B, tp_col=2, tp_row=4, sequence_parallel=True) == \
        pytest.approx(sbh * (8 / 8 + 24 / 2))
    assert layer_activation_bytes(GPT, S, B, cp=4) == pytest.approx(32 * sbh / 4)


def test_pipeline_in_flight_and_offload():
    plan = Plan(pp=4, micro_batch_size=B)
    parts = activation_parts(GPT, plan, S, 2)
    per_layer = layer_activation_bytes(GPT, S, B, dtype_bytes=2)
    assert parts.unit == pytest.approx(per_layer * GPT.n_layers / 4)  # one layer per stage
    device, host = combine_activations(parts, 4, ScheduleCost(0.0, 4.0, "test", 1.0))
    assert device == pytest.approx(max(4 * parts.unit, parts.unit + parts.logits))
    offloaded, host_off = combine_activations(parts, 4, ScheduleCost(0.0, 3.0, "test", 1.0, offloaded=2.0))
    assert offloaded == pytest.approx(max(3 * parts.unit, parts.unit + parts.logits))
    assert host_off == pytest.approx(2 * parts.unit) and host == 0.0
    # GPipe: all forwards first, so the last stage also keeps every microbatch's logits
    gpipe, _ = combine_activations(parts, 4, ScheduleCost(0.0, 4.0, "test", 4.0, head_logits=4.0))
    assert gpipe == pytest.approx(4 * (parts.unit + parts.logits))
    # zbh1 / V shapes: the head's rank holds several microbatches (each until its W) and the logits
    zb, _ = combine_activations(parts, 4, ScheduleCost(0.0, 4.0, "test", 4.0))
    assert zb == pytest.approx(4 * parts.unit + parts.logits)


def test_offloaded_units_are_the_runtime_offload_plan_simulated():
    """PipeOffload: the device and host units are the runtime's action list (offloads and reloads
    included) simulated, per rank; beyond the simulated range the closed form keeps the running
    chunk and RELOAD_LEAD reloaded ones and is never below that."""
    from perfmodel.schedule_sim import simulate
    from perfmodel.schedules import RELOAD_LEAD, build

    for sched, p, m, v in (("1f1b", 4, 8, 1), ("interleaved", 4, 8, 2), ("zbv", 4, 8, 2), ("gpipe", 2, 4, 1)):
        for frac in (0.5, 1.0):
            sim = simulate(build(sched, p, m, v, frac))
            cost = pipeline.schedule_cost(sched, p, m, v, frac)
            assert cost.peak_activations == max(sim.peak_activations) and cost.offloaded == max(sim.peak_offloaded)
            assert cost.peak_activations <= pipeline.schedule_cost(sched, p, m, v).peak_activations
    assert pipeline.schedule_cost("1f1b", 4, 8, 1, 1.0).peak_activations == 1 + RELOAD_LEAD  # running + reloaded
    big = pipeline.schedule_cost("1f1b", 32, 128, 1, 1.0)  # closed form
    assert big.source == "closed-form" and big.peak_activations == 1 + RELOAD_LEAD and big.offloaded == 32 - 3
    half = pipeline.schedule_cost("interleaved", 32, 128, 2, 0.5)
    full = pipeline.schedule_cost("interleaved", 32, 128, 2)
    kept = (1 + RELOAD_LEAD) / 2
    assert half.peak_activations == pytest.approx(full.peak_activations - 0.5 * (full.peak_activations - kept))


def test_head_rank_units_match_the_simulation():
    """The closed forms' units on the head's rank equal the simulator's (last rank; rank 0 in a V)."""
    checked = 0
    for sched, p, m, v in grid():
        entry = pipeline.simulated(sched, p, m, v)
        assert pipeline.closed_form(sched, p, m, v).head_activations == pytest.approx(entry.head_activations), \
            (sched, p, m, v)
        checked += 1
    assert checked > 100
    assert pipeline.schedule_cost("zbh1", 8, 2).head_activations == 2  # the validation's pp8 zbh1 mbs8
    assert pipeline.schedule_cost("1f1b", 8, 16).head_activations == 1


def test_stage_params_cover_the_model():
    assert stage_params(GPT, 1, 1024) == n_params(GPT)
    # pp=2: the bigger of (2 blocks + embedding) and (2 blocks + head + final LayerNorm)
    assert stage_params(GPT, 2, 1024) == 2 * layer_params(GPT) + GPT.vocab_size * H + 2 * H


def test_uneven_stages_take_the_most_loaded_rank_of_the_runtime_split():
    from perfmodel.split import split_layers

    seven = replace(GPT, n_layers=7)
    assert [len(r) for r in split_layers(seven, 4, 1024)] == [2, 2, 2, 1]  # the head's stage is lighter
    # stage 0: 2 blocks + the embedding (stage 3: 1 block + the head is smaller)
    assert stage_params(seven, 4, 1024) == 2 * layer_params(seven) + seven.vocab_size * H


def test_virtual_chunks_are_placed_as_the_runtime_places_them():
    eight, block, vocab = replace(GPT, n_layers=8), layer_params(GPT), GPT.vocab_size * H
    # pp=2 with 2 chunks per rank: 4 chunks of 2 layers. Interleaved puts chunks 0, 2 on rank 0
    # (4 blocks + embedding) and 1, 3 on rank 1 (4 blocks + head + final norm)
    assert stage_params(eight, 2, 1024, "interleaved", 2) == 4 * block + vocab + 2 * H
    # zbv: chunks 0 and 3 on rank 0 (embedding and head), 1 and 2 on rank 1
    assert stage_params(eight, 2, 1024, "zbv", 2) == 4 * block + 2 * vocab + 2 * H


def test_cached_depth_weights_count_every_block_the_rank_holds():
    """cache_tp_weights keeps every gathered Block of the rank: under a V the busiest rank's
    Blocks as the runtime places them, not one pp-way stage's."""
    from perfmodel.comm import tensor_volumes
    from perfmodel.memory import state_bytes
    from perfmodel.specs import Cluster

    six = ModelSpec(n_layers=6, d_model=256, n_heads=8, n_kv_heads=8, d_ff=1024, vocab_size=32000, max_seq_len=512)
    c = Cluster()
    plan = Plan(pp=2, tp_depth=2, cache_tp_weights=True)
    block = tensor_volumes(six, plan, 0, c.dtype_bytes).weights
    one_chunk = state_bytes(six, plan, c, 512)[3]  # 1F1B: the split puts 5 Blocks on one stage
    v = state_bytes(six, replace(plan, schedule="zbv", virtual_stages=2), c, 512)[3]
    assert one_chunk == pytest.approx(5 * block)
    assert v == pytest.approx(4 * block)  # zbv: rank 1 holds chunks 1 and 2, 4 Blocks; rank 0 2 and the ends
