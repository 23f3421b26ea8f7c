"""`axon convert` HF -> Axon streams (axon/convert.py `hf_to_axon`): every Hugging Face tensor is
read once, and at no time does the converter hold more than one tensor it made (the largest: a
weight or a zero Adam state), never the model; the result loads to the same logits."""
from __future__ import annotations

import torch
from safetensors import safe_open

from axon.convert import Streamed, hf_to_axon
from axon.generate import load_hf_model, load_model
from tests.hf_fixture import make_llama


def test_hf_to_axon_holds_one_tensor_at_a_time(tmp_path):
    hf = make_llama(tmp_path / "hf", n_layers=2)
    sizes = []
    for file in sorted(hf.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            sizes += [f.get_slice(k).get_shape() for k in f.keys()]
    hf_bytes = sum(4 * torch.Size(s).numel() for s in sizes)  # fp32 files
    largest = 4 * max(torch.Size(s).numel() for s in sizes)
    stats = Streamed()
    out = hf_to_axon(hf, tmp_path / "axon", stats)
    assert stats.bytes_read == hf_bytes  # each tensor read once, nothing else
    assert stats.peak_live_bytes == stats.largest_bytes == largest  # one tensor alive at a time
    assert hf_bytes > 5 * largest  # ... of a model many times larger
    tokens = torch.randint(256, (1, 12), generator=torch.Generator().manual_seed(0))  # [B, S]
    with torch.no_grad():
        assert torch.equal(load_model(out)(tokens), load_hf_model(hf)(tokens))
