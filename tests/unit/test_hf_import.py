"""Hugging Face Llama import and export in one process, against `transformers` as the oracle:
logits of a tiny random Llama (GQA, Llama 3.1 rope scaling, untied and tied) equal transformers'
(fp32, max |difference| <= 1e-5 x max |logit|); config.json round trip; streamed slices read only
the shard; `axon convert` both ways; index file names cannot leave the model directory."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from axon import hf_config, hf_load
from axon.convert import axon_to_hf, hf_to_axon, main as convert_main
from axon.hf_config import HFError
from axon.init import materialize
from axon.model import build
from parallel.layout import ParamLayout
from parallel.shard import Shard
from tests.hf_fixture import hf_logits, make_llama

TOL = 1e-5  # relative to the largest logit (fp32; measured ~4e-7)


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    return make_llama(tmp_path_factory.mktemp("hf") / "untied")


def axon_logits(path, tokens, spec=None):
    spec = spec or hf_config.spec_from_dir(path)
    model = build(spec)
    materialize(model, spec, 0, torch.device("cpu"))
    hf_load.load_params(hf_load.SliceReader(path), dict(model.named_parameters()), {}, spec)
    with torch.no_grad():
        return model(tokens)  # [B, S, V]


def close(a, b):
    return (a - b).abs().max().item() <= TOL * b.abs().max().item()


@pytest.mark.parametrize("tied", [False, True])
def test_logits_match_transformers(tmp_path, untied, tied):
    path = make_llama(tmp_path / "tied", tied=True) if tied else untied
    tokens = torch.randint(0, 256, (2, 100), generator=torch.Generator().manual_seed(0))  # past 64: scaled band
    want = hf_logits(path, tokens)
    assert close(axon_logits(path, tokens), want)
    spec = hf_config.spec_from_dir(path)
    assert spec.rope_scaling == "llama3" and spec.tied_embeddings == tied and spec.n_kv_heads == 2
    assert not close(axon_logits(path, tokens, replace(spec, rope_scaling="none")), want)  # scaling matters


def test_config_round_trip(untied):
    spec = hf_config.spec_from_dir(untied)
    assert hf_config.spec_from_config(hf_config.hf_config(spec)) == spec
    plain = replace(spec, rope_scaling="none", tied_embeddings=True, rope_original_max_len=8192)  # defaults
    assert hf_config.spec_from_config(hf_config.hf_config(plain)) == plain
    with pytest.raises(HFError, match="rope type 'yarn'"):
        hf_config.spec_from_config({**hf_config.hf_config(spec), "rope_scaling": {"rope_type": "yarn"}})


@pytest.mark.parametrize("shard", [Shard(rows=slice(16, 32)), Shard(cols=slice(32, 64)),
                                   Shard(rows=slice(0, 32), cols=slice(0, 32), flat=slice(256, 512))])
def test_slices_read_only_the_shard(untied, shard):
    spec = hf_config.spec_from_dir(untied)
    full = hf_load.SliceReader(untied)
    name = "layers.1.attn.wq.weight"
    whole = hf_load.read_shard(full, spec, name, ParamLayout((64, 64)))  # Axon row order
    reader = hf_load.SliceReader(untied)
    got = hf_load.read_shard(reader, spec, name, ParamLayout((64, 64), shard, split=("tp_col", "tp_row"),
                                                              depth_flat=shard.flat is not None))
    piece = whole.reshape(64, 64)[shard.rows, shard.cols]
    want = piece.reshape(-1)[shard.flat] if shard.flat is not None else piece.reshape(-1)
    assert torch.equal(got, want)
    assert reader.bytes_read == want.numel() * 4  # whole heads, whole depth rows: nothing extra


def test_index_names_cannot_leave_the_directory(tmp_path, untied):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((untied / "config.json").read_text())
    (bad / hf_load.INDEX).write_text(json.dumps({"weight_map": {"lm_head.weight": "../secret.safetensors"}}))
    with pytest.raises(HFError, match="not a plain file name"):
        hf_load.SliceReader(bad)
    with pytest.raises(HFError, match="model.init='oops'"):
        hf_load.init_dir("oops")


def test_convert_round_trip_loads_in_transformers(tmp_path, untied):
    tokens = torch.randint(0, 256, (2, 80), generator=torch.Generator().manual_seed(1))
    ckpt = hf_to_axon(untied, tmp_path / "axon")
    assert json.loads((ckpt / "axon.json").read_text())["step"] == 0
    assert convert_main([str(ckpt), str(tmp_path / "back"), "--max-shard-size", "60KB"]) == 0
    files = sorted(p.name for p in (tmp_path / "back").glob("*.safetensors"))
    assert len(files) > 1 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert torch.equal(hf_logits(tmp_path / "back", tokens), hf_logits(untied, tokens))
    bf16 = axon_to_hf(ckpt, tmp_path / "bf16", dtype="bfloat16")
    assert json.loads((bf16 / "config.json").read_text())["torch_dtype"] == "bfloat16"
