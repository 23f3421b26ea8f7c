"""A CPU preset's per-rank rates follow the ranks that share the machine (perfmodel/specs.py
`Cluster.sharing`): local-cpu is measured with 8 ranks on its cores, and a run of 4 ranks gets
twice each rank's share, its loopback link included; a GPU preset is unchanged."""
import pytest

from axon.config import freeze, load
from axon.metrics import device_peak_flops
from perfmodel.specs import Cluster

CPU = Cluster(name="cpu", gpus_per_node=8, compute_units=2, measured_ranks=8, peak_flops=1e10, mem_bw=1e9,
              host_bw=1e9, hbm_bytes=3e9, block_overhead_s=0.008, intra_bw=4e8, intra_lat=2e-3, inter_bw=5e8,
              inter_lat=1e-3)


@pytest.mark.parametrize("ranks,scale", [(8, 1.0), (4, 2.0), (2, 4.0), (1, 4.0), (16, 0.5)])
def test_rates_scale_with_each_ranks_share_of_the_cores(ranks, scale):
    c = CPU.sharing(ranks)
    assert c.gpus_per_node == ranks and c.measured_ranks == ranks
    assert (c.peak_flops, c.mem_bw, c.host_bw) == pytest.approx((1e10 * scale, 1e9 * scale, 1e9 * scale))
    assert c.block_overhead_s == pytest.approx(0.008 / scale)  # dispatch is CPU time, shared alike
    # loopback: bytes copied by the rank's CPU share, latency mostly waiting for descheduled peers
    assert (c.intra_bw, c.intra_lat) == pytest.approx((4e8 * scale, 2e-3 / scale))
    assert (c.inter_bw, c.inter_lat) == (5e8, 1e-3)  # another node's link is not the cores' to share
    assert c.hbm_bytes == pytest.approx(3e9 * 8 / ranks)  # the RAM the ranks share
    assert c.sharing(ranks) == c  # idempotent
    # the machine's peak (MFU's denominator) does not depend on how many ranks share it
    assert device_peak_flops(c, ranks) * ranks == pytest.approx(device_peak_flops(CPU, 8) * 8)

def test_device_presets_are_unchanged():
    gpu = Cluster(name="gpu", gpus_per_node=8)
    assert gpu.sharing(4) is gpu and gpu.sharing(8) is gpu


def test_the_config_rescales_a_cpu_preset_run_with_fewer_ranks():
    full = freeze(load(["cluster=local-cpu"])).cluster
    half = freeze(load(["cluster=local-cpu", f"cluster.gpus_per_node={full.gpus_per_node // 2}"])).cluster
    assert full.measured_ranks == full.gpus_per_node == 8  # what configs/cluster/local-cpu.yaml was measured with
    assert half.peak_flops == pytest.approx(2 * full.peak_flops)
    assert half == full.sharing(4)
