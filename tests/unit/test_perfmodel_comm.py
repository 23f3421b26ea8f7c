"""Ring alpha-beta costs, group placement under the grid's rank order, per-layer TP volumes."""
import pytest

from perfmodel import comm
from perfmodel.specs import ModelSpec, Plan

LINK = comm.Link(alpha=1e-5, beta=1e9)


def test_ring_formulas():
    # all-reduce 2(G-1)alpha + 2(G-1)/G S/beta; all-gather / reduce-scatter half of that
    assert comm.all_reduce(1e9, 4, LINK) == pytest.approx(6e-5 + 1.5)
    assert comm.all_gather(1e9, 4, LINK) == pytest.approx(3e-5 + 0.75)
    assert comm.reduce_scatter(8e6, 8, LINK) == pytest.approx(7e-5 + 7e-3)
    assert comm.all_reduce(1e9, 1, LINK) == 0.0


def test_placement_follows_rank_order():
    # innermost first: tp_col, tp_row, tp_depth, cp, dp, pp
    plan = Plan(tp_col=2, tp_row=2, dp=4)
    assert comm.stride_of(plan, "tp_row") == 2 and comm.stride_of(plan, "dp") == 4
    assert comm.inside_node(plan, ("tp_col",), 4) and comm.inside_node(plan, ("tp_row",), 4)
    assert not comm.inside_node(plan, ("dp",), 4)  # dp ranks are 4 apart: one per node
    assert comm.inside_node(plan, ("dp",), 16)
    assert not comm.inside_node(Plan(tp_col=3, dp=2), ("tp_col",), 4)  # blocks of 3 straddle nodes of 4
    assert comm.inside_node(Plan(cp=2, dp=2), ("cp", "dp"), 4)


def test_link_choice():
    from perfmodel.specs import Cluster

    c = Cluster(gpus_per_node=4, intra_bw=100e9, inter_bw=10e9, intra_lat=1e-6, inter_lat=5e-6)
    plan = Plan(tp_col=4, dp=2)
    assert comm.link_for(plan, ("tp_col",), c) == comm.Link(1e-6, 100e9)
    assert comm.link_for(plan, ("dp",), c) == comm.Link(5e-6, 10e9)


MHA = ModelSpec(n_layers=2, d_model=64, n_heads=4, n_kv_heads=4, d_ff=256, vocab_size=128, mlp="gelu")


def test_megatron_1d_volumes():
    # tp_col = t: per layer Megatron's 2 forward all-reduces of b*s*h elements; backward, the dX
    # of q, k, v summed locally and reduced once, and the MLP input projection's once: Megatron's
    # 2 calls of b*s*h (parallel/tensor.py groups them), or with SP reduce-scatters once per
    # sequence gather (2 calls of b*s*h)
    tokens, e = 32, 2
    vol = comm.tensor_volumes(MHA, Plan(tp_col=4), tokens, e)
    assert vol.fwd_over_col == 2 * tokens * 64 * e
    assert vol.bwd_over_col == 2 * tokens * 64 * e
    assert vol.calls_over_col == (2, 2) and vol.calls_over_row == (4, 2)
    sp = comm.tensor_volumes(MHA, Plan(tp_col=4, sequence_parallel=True), tokens, e)
    assert sp.bwd_over_col == 2 * tokens * 64 * e and sp.calls_over_col == (2, 2)
    # weights: the block's k x n matrices, split over tp_col x tp_row
    assert vol.weights == (64 * 192 + 64 * 64 + 64 * 256 + 256 * 64) / 4 * e


def test_3d_volumes_follow_axonn():
    # first of a pair (wq, wk, wv, w_up) all-reduces its output over tp_row, each input group
    # (qkv, mlp input) its summed dX over tp_col; the second (wo, w_down) its output over tp_col
    # and its dX over tp_row
    x, y, tokens = 2, 4, 16
    vol = comm.tensor_volumes(MHA, Plan(tp_col=x, tp_row=y), tokens, 1)
    assert vol.fwd_over_row == tokens * (192 + 256) / x
    assert vol.bwd_over_col == tokens * (64 + 64) / y
    assert vol.fwd_over_col == tokens * (64 + 64) / y
    assert vol.bwd_over_row == tokens * (64 + 256) / x


def test_context_and_pipeline_volumes():
    plan = Plan(cp=4, tp_col=2)
    assert comm.cp_ring_bytes(MHA, plan, 16, 2) == 3 * 2 * 16 * (4 * 16 / 2) * 2
    assert comm.p2p_bytes(MHA, Plan(pp=2), 16, 2) == 16 * 64 * 2
    assert comm.p2p_bytes(MHA, Plan(pp=2, tp_col=2, sequence_parallel=True), 16, 2) == 16 * 64
