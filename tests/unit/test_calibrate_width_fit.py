"""axon.calibrate's Block law fitted across two widths without measuring: the fixed part, the
rate and how the rate falls with the Block's smallest dimension (perfmodel/block_cost.py)."""
import pytest

from axon.calibrate import BLOCK_BATCHES, BLOCK_WIDTHS, block_law_fit, widened
from perfmodel.block_cost import block_compute
from perfmodel.specs import Cluster, ModelSpec, Plan

SPEC = ModelSpec()
PEAK, SEQ = 2e10, 128


def _times(eff: float, overhead: float, half: float) -> list[tuple[ModelSpec, int, float]]:
    """(spec, sequences, seconds) of every calibrated Block shape, as the model prices it."""
    c = Cluster(peak_flops=PEAK, gemm_half_dim=half, compute_efficiency=eff)
    out = []
    for k in BLOCK_WIDTHS:
        for b in BLOCK_BATCHES:
            bc = block_compute(widened(SPEC, k), Plan(micro_batch_size=b), c, SEQ)
            out.append((widened(SPEC, k), b, overhead + 3 * (bc.gemm + bc.attn)))
    return out


def test_widened_keeps_the_head_size():
    wide = widened(SPEC, 2)
    assert (wide.d_model, wide.d_ff, wide.n_heads, wide.n_kv_heads) == (
        2 * SPEC.d_model, 2 * SPEC.d_ff, 2 * SPEC.n_heads, 2 * SPEC.n_kv_heads)
    assert wide.d_model // wide.n_heads == SPEC.d_model // SPEC.n_heads


@pytest.mark.parametrize("eff,overhead,half", [(0.47, 0.018, 26.0), (0.8, 0.0, 100.0), (0.3, 0.05, 0.0)])
def test_block_law_fit_recovers_the_model_it_prices_with(eff, overhead, half):
    assert block_law_fit(_times(eff, overhead, half), SEQ, PEAK) == pytest.approx((eff, overhead, half), abs=1e-9)


def test_block_law_fit_declines_what_noise_makes_unphysical():
    samples = _times(0.47, 0.018, 26.0)
    faster_than_peak = [(spec, b, t / 10) for spec, b, t in samples]  # above the GEMM peak
    assert block_law_fit(faster_than_peak, SEQ, PEAK) is None
    wider_faster = [(spec, b, t if spec == SPEC else t / 4) for spec, b, t in samples]  # the wide Block too fast
    assert block_law_fit(wider_faster, SEQ, PEAK) is None
