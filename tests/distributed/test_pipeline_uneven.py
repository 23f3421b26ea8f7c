"""Uneven pipeline stages (layer counts that do not divide the chunks, like 126 layers over 16):
7 layers over pp=4, and over pp=2 x 2 interleaved chunks, train exactly like one process (same
losses over several clipped AdamW steps, rel 1e-4 as tests/distributed/test_trainer_4d.py)."""
from __future__ import annotations

import pytest

from tests.distributed.trainer_driver import STEPS, make_cfg, train

SEVEN = [*STEPS, "model.n_layers=7"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, dist_pools):
    return dist_pools.run(1, train, make_cfg(tmp_path_factory.mktemp("ref"), "ref", *SEVEN))[0][1]


@pytest.mark.parametrize("layout,world", [(["parallel.pp=4"], 4),
                                          (["parallel.pp=2", "parallel.schedule=interleaved",
                                            "parallel.virtual_stages=2"], 2)])
def test_seven_layers_match_single_process(reference, layout, world, tmp_path, dist_pools):
    got = dist_pools.run(world, train, make_cfg(tmp_path, "run", *layout, *SEVEN))[0][1]
    assert got == pytest.approx(reference, rel=1e-4)
