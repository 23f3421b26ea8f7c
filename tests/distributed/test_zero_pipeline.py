"""ZeRO 1-3 with several pipeline chunks per rank (interleaved 1F1B; the V schedule zbv, whose
backward is split into B and W) train exactly like the plain data-parallel trainer on the same
layout: every chunk's parameters are sharded, and a unit's reduction waits for its W."""
from __future__ import annotations

import pytest

from tests.distributed.trainer_driver import train_all, variants


@pytest.mark.parametrize("layout,world,extras", [
    (["parallel.pp=2", "parallel.dp=2", "parallel.schedule=interleaved", "parallel.virtual_stages=2",
      "parallel.micro_batch_size=2"], 4, [[], ["parallel.zero=1"], ["parallel.zero=2"], ["parallel.zero=3"]]),
    (["parallel.pp=2", "parallel.schedule=zbv", "parallel.virtual_stages=2"], 2,
     [[], ["parallel.zero=2"], ["parallel.zero=3", "parallel.offload.optimizer=true"]]),
], ids=["interleaved-dp2", "zbv"])
def test_zero_with_pipeline_chunks_matches_plain(layout, world, extras, tmp_path, dist_pools):
    ref, *got = dist_pools.run(world, train_all, variants(tmp_path, layout, extras))[0]
    assert ref[-1] < ref[0]
    for losses in got:
        assert losses == pytest.approx(ref, rel=1e-5)
