"""`axon generate` tensor-parallel (axon/generate.py `load_tensor_parallel`): under tp_col=2 (1D)
and AxoNN's 3D tp 2x2x1 (column x row x depth) and 1x2x2, every rank produces the same tokens,
and greedy decoding equals the single-process model's, from a Hugging Face directory (each rank
reads its slices) and from an Axon checkpoint (DCP reshards). A tiny Llama made with
`transformers` (tests/hf_fixture.py) is the model."""
from __future__ import annotations

import pytest
import torch

from axon.convert import hf_to_axon
from axon.generate import greedy, load_hf_model
from tests.distributed.generate_driver import tp_generate
from tests.hf_fixture import make_llama


def test_tp2_generates_the_single_process_tokens(tmp_path, dist_pools):
    hf_dir = make_llama(tmp_path / "hf", n_layers=2, scaled=False)
    ckpt = hf_to_axon(hf_dir, tmp_path / "axon")
    prompts = torch.randint(256, (2, 5), generator=torch.Generator().manual_seed(1))  # [N, P]
    want = greedy(load_hf_model(hf_dir), prompts, 8)  # [N, 8]
    sources = [f"hf:{hf_dir}", str(ckpt)]
    ranks = dist_pools.run(2, tp_generate, sources, prompts, 8)
    for source in sources:
        assert torch.equal(ranks[0][source], want), source
    for key in ranks[0]:
        assert torch.equal(ranks[1][key], ranks[0][key]), key


@pytest.mark.parametrize("tp", [(2, 2, 1), (1, 2, 2)], ids=["2x2x1", "1x2x2"])
def test_3d_tp_generates_the_single_process_tokens(tp, tmp_path, dist_pools):
    """From the Hugging Face directory only (the checkpoint's resharding is the 1D test's)."""
    hf_dir = make_llama(tmp_path / "hf", n_layers=2, scaled=False)
    prompts = torch.randint(256, (2, 5), generator=torch.Generator().manual_seed(1))  # [N, P]
    want = greedy(load_hf_model(hf_dir), prompts, 6)  # [N, 6]
    ranks = dist_pools.run(4, tp_generate, [f"hf:{hf_dir}"], prompts, 6, tp)
    assert torch.equal(ranks[0][f"hf:{hf_dir}"], want)
    for rank in ranks[1:]:
        for key in ranks[0]:
            assert torch.equal(rank[key], ranks[0][key]), key
