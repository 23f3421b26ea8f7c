"""axon.calibrate's fits without measuring: the Block cost split into a fixed part and a rate."""
import pytest

from axon.calibrate import block_fit
from perfmodel.block_cost import block_compute
from perfmodel.specs import Cluster, ModelSpec, Plan

SPEC = ModelSpec()
PEAK, HALF = 2e10, 30.0


def _ideal(b: int) -> float:
    bc = block_compute(SPEC, Plan(micro_batch_size=b), Cluster(peak_flops=PEAK, gemm_half_dim=HALF,
                                                                compute_efficiency=1.0), 128)
    return 3 * (bc.gemm + bc.attn)


def test_block_fit_recovers_overhead_and_efficiency():
    times = {b: 0.012 + _ideal(b) / 0.4 for b in (1, 4)}
    eff, overhead = block_fit(SPEC, 128, times, PEAK, HALF)
    assert eff == pytest.approx(0.4) and overhead == pytest.approx(0.012)


def test_block_fit_falls_back_to_a_rate_when_noise_hides_the_fixed_part():
    times = {1: 0.05, 4: 0.049}  # the larger batch measured faster: no slope to fit
    eff, overhead = block_fit(SPEC, 128, times, PEAK, HALF)
    assert overhead == 0.0 and eff == pytest.approx(_ideal(4) / 0.049)
    eff, overhead = block_fit(SPEC, 128, {1: _ideal(1) / 0.5, 4: 0.001 + _ideal(4) / 0.5}, PEAK, HALF)
    assert overhead == 0.0 and eff == pytest.approx(_ideal(4) / (0.001 + _ideal(4) / 0.5))  # negative intercept
