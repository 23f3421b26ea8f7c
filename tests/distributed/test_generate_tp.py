"""`axon generate` tensor-parallel (axon/generate.py `load_tensor_parallel`): under tp_col=2 every
rank produces the same tokens, and greedy decoding equals the single-process model's, from a
Hugging Face directory (each rank reads its slices) and from an Axon checkpoint (DCP reshards).
A tiny Llama made with `transformers` (tests/hf_fixture.py) is the model."""
from __future__ import annotations

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
