"""`axon dry-run` (axon/dry_run.py) on scaled-down versions of the two Llama 3.1 405B recipe layouts
(docs/recipes/llama3.1-405b.md; configs/parallel/llama3.1-405b-*.yaml): one rank built over torch's
fake process group, its params, grads, optimizer states, activations and their sum (the peak)
within 10% of the performance model's prediction. Same layout shape as the recipe (tp/pp/dp/cp,
ZeRO, schedule, offload); fewer, narrower layers and a shorter sequence, so it runs on a CPU."""
from __future__ import annotations

import pytest

from axon.config import freeze, load
from axon.dry_run import DEFAULTS, ROLES, dry_run

SMALL = ["model=tiny", "model.d_model=128", "model.n_heads=8", "model.n_kv_heads=8", "model.d_ff=416",
         "train.seq_len=128", "train.dtype=bf16"]
LAYOUTS = {
    # the DGX-H100 pick's family: interleaved, 3D tp 2x1x4 + SP, ring cp, ZeRO-3, every activation offloaded
    "dgx-h100": ["parallel=llama3.1-405b-dgx-h100", "cluster=dgx-h100", "parallel.dp=1", "parallel.cp=2",
                 "parallel.pp=2", "parallel.virtual_stages=2", "model.n_layers=8", "train.global_batch_size=16"],
    # the Frontier pick's family: zbv, 3D tp 8x1x32 + SP (depth 2 here), optimizer offload and half the
    # activations offloaded. 22 layers: the runtime's 2pp chunks put 12 Blocks on rank 1, and the model
    # prices each rank's own chunks as the runtime places them (perfmodel/split.py `rank_loads`)
    "frontier": ["parallel=llama3.1-405b-frontier", "cluster=frontier", "parallel.tp_depth=2",
                 "model.n_layers=22", "train.global_batch_size=8"],
}


pytestmark = pytest.mark.usefixtures("no_process_group")  # tests/conftest.py


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_scaled_recipe_rank_matches_the_prediction(name, tmp_path):
    cfg = freeze(load([*DEFAULTS, *SMALL, *LAYOUTS[name], f"run.dir={tmp_path / 'run'}"]))
    d = dry_run(cfg)
    for role in ROLES:
        assert d.measured[role] == pytest.approx(d.predicted[role], rel=0.10), (role, d.to_dict())
