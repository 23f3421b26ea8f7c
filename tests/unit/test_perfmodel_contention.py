"""Contention: collectives overlapped with one pass's compute share their link (perfmodel/estimate.py
`share_link`), the data-parallel / ZeRO traffic hides only behind what that link has left, and the
tune output says what is hidden where and what is exposed."""
import pytest

from axon import tune_explain
from perfmodel import comm
from perfmodel.block_cost import BlockCompute, BlockCosts, share_link
from perfmodel.estimate import MicrobatchCosts, estimate, gradient_sync
from perfmodel.specs import Cluster, ModelSpec, Plan

C = Cluster(gpus_per_node=8, intra_bw=100e9, inter_bw=10e9, intra_lat=0.0, inter_lat=0.0)


def test_one_link_hides_at_most_the_pass_compute_for_all_its_collectives():
    # by hand: the NIC carries dp 3 s and cp 2 s behind a 4 s pass -> busy 5 s, 1 s exposed, the hidden
    # parts scaled by 4/5; NVLink's 4 s of tp fits its 4 s and stays hidden
    hidden = {("inter-node", "dp"): 3.0, ("inter-node", "cp"): 2.0, ("intra-node", "tp"): 4.0}
    assert share_link(hidden, 4.0, C) == 1.0
    assert hidden == pytest.approx({("inter-node", "dp"): 2.4, ("inter-node", "cp"): 1.6, ("intra-node", "tp"): 4.0})
    alone = {("inter-node", "dp"): 3.0}
    assert share_link(alone, 4.0, C) == 0.0  # either alone is hidden


def _microbatch(backward: float, busy_inter_bwd: float) -> MicrobatchCosts:
    block = BlockCosts(BlockCompute(0.0, 0.0, 0.0), 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, {}, {}, {},
                       {"inter-node": busy_inter_bwd})
    return MicrobatchCosts(compute=0.0, recompute=0.0, tensor=0.0, context=0.0, backward=backward, layers=1,
                           block=block)


def test_gradient_reduce_sharing_the_nic_with_hidden_ring_hops_is_exposed():
    plan = Plan(dp=16, bucket_mb=1024.0)  # dp spans two nodes of 8: the NIC
    psi = 1e9 / 4  # 1 GB of fp32 gradients
    reduce = gradient_sync(plan, C, psi, _microbatch(0.0, 0.0), 1, 1)  # all exposed behind no compute
    window = 1.2 * reduce
    last_bucket = comm.all_reduce(2**20, 16, comm.link_for(plan, ("cp", "dp"), C))
    assert gradient_sync(plan, C, psi, _microbatch(window, 0.0), 1, 1) == last_bucket  # hidden alone
    # ring hops keep the NIC busy for half the backward (0.6 R): the all-reduce R gets the other 0.6 R
    shared = gradient_sync(plan, C, psi, _microbatch(window, window / 2), 1, 1)
    assert shared == pytest.approx(0.4 * reduce) and shared > last_bucket


def test_zero3_at_512_ranks_is_not_fully_hidden_and_tune_shows_it():
    m = ModelSpec(n_layers=8, d_model=1024, n_heads=8, n_kv_heads=8, d_ff=4096, vocab_size=32000, max_seq_len=2048)
    c = Cluster(gpus_per_node=8, peak_flops=1e15, hbm_bytes=80e9, intra_bw=360e9, inter_bw=45e9, intra_lat=5e-6,
                inter_lat=1e-5)
    e = estimate(m, Plan(dp=512, zero=3), c, 512, 2048)
    traffic = e.overlap["inter-node"]["dp"] + e.breakdown["grad_sync_s"]
    assert e.breakdown["grad_sync_s"] > 0 and e.overlap["inter-node"]["dp"] <= e.overlap["inter-node"]["compute"] * (1 + 1e-12)
    assert traffic > e.overlap["inter-node"]["compute"]  # more gather traffic than the compute it hides behind
    lines = tune_explain.overlap(e)
    assert lines[0].startswith("overlap on the inter-node link: dp ") and "hidden behind" in lines[0]
    assert lines[-1].startswith("exposed communication: ") and "exposed grad sync" in lines[-1]
