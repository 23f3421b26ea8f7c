"""Datasets (embedded corpus, .bin token files) and the batch sampler: determinism, layout
independence, epochs, resume, and the errors that name the setting to change."""
import json

import numpy as np
import pytest
import torch

from axon.config import Data
from axon.data import BatchSampler, TokenDataset, open_dataset
from axon.tokenizer import ByteTokenizer


def _data(path=None, dtype="auto", tokenizer="byte", val_fraction=0.0):
    return Data(name="t", path=None if path is None else str(path), dtype=dtype, tokenizer=tokenizer,
                val_fraction=val_fraction)


def _ds(n: int) -> TokenDataset:
    return TokenDataset(name="arange", tokens=np.arange(n, dtype=np.uint32), tokenizer="byte", eot_id=None,
                        val_fraction=0.0)


# ---- datasets ----
def test_embedded_corpus():
    ds = open_dataset(_data(), vocab_size=256)
    assert ds.tokens.dtype == np.uint8 and not ds.tokens.flags.writeable
    assert 2_000_000 < len(ds) < 5_000_000
    assert int((ds.tokens == ByteTokenizer.eot_id).sum()) == 6  # six novels, each ended once
    assert ByteTokenizer().decode(ds.tokens[:21]) == "SENSE AND SENSIBILITY"
    assert open_dataset(_data(), vocab_size=256).tokens is ds.tokens  # tokenized once per process


def test_embedded_corpus_errors():
    with pytest.raises(ValueError, match="model.vocab_size=128"):
        open_dataset(_data(), vocab_size=128)
    with pytest.raises(ValueError, match="data.tokenizer=byte"):
        open_dataset(_data(tokenizer="tok.json"), vocab_size=256)
    with pytest.raises(ValueError, match="data.val_fraction"):
        open_dataset(_data(val_fraction=1.0), vocab_size=256)


def test_split():
    ds = open_dataset(_data(val_fraction=0.1), vocab_size=256)
    train, val = ds.split("train"), ds.split("val")
    assert len(val) == round(0.1 * len(ds)) and len(train) + len(val) == len(ds)
    assert np.array_equal(np.concatenate([train.tokens, val.tokens]), ds.tokens)
    assert len(train.split("train")) == len(train)  # a split is a dataset with nothing held out
    with pytest.raises(ValueError, match="raise data.val_fraction"):
        train.split("val")
    with pytest.raises(ValueError, match="'train' or 'val'"):
        ds.split("test")


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_bin_without_sidecar(tmp_path, dtype):
    big = 60000 if dtype == "uint16" else 70000  # 70000 needs uint32
    tokens = np.array([5, big, 9, 255], dtype=dtype)
    tokens.tofile(tmp_path / "raw.bin")
    with pytest.raises(ValueError, match="data.dtype=uint16 or data.dtype=uint32"):
        open_dataset(_data(tmp_path / "raw.bin"), vocab_size=70001)
    ds = open_dataset(_data(tmp_path / "raw.bin", dtype=dtype), vocab_size=70001)
    assert isinstance(ds.tokens, np.memmap) and ds.tokens.tolist() == tokens.tolist()
    with pytest.raises(ValueError, match=f"token id {big} but model.vocab_size=1000"):  # found by scanning
        open_dataset(_data(tmp_path / "raw.bin", dtype=dtype), vocab_size=1000)


def test_bin_inconsistencies(tmp_path):
    np.array([1, 2, 3], dtype=np.uint16).tofile(tmp_path / "x.bin")
    with pytest.raises(ValueError, match="not a whole number of uint32 tokens"):
        open_dataset(_data(tmp_path / "x.bin", dtype="uint32"), vocab_size=256)
    meta = {"dtype": "uint16", "n_tokens": 4, "max_token_id": 3}
    (tmp_path / "x.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="truncated or stale"):
        open_dataset(_data(tmp_path / "x.bin"), vocab_size=256)
    (tmp_path / "x.json").write_text(json.dumps({**meta, "n_tokens": 3}))
    assert len(open_dataset(_data(tmp_path / "x.bin"), vocab_size=256)) == 3
    with pytest.raises(ValueError, match="set data.dtype=auto"):
        open_dataset(_data(tmp_path / "x.bin", dtype="uint32"), vocab_size=256)
    with pytest.raises(ValueError, match="model.vocab_size=3"):  # from the sidecar's max_token_id
        open_dataset(_data(tmp_path / "x.bin"), vocab_size=3)
    with pytest.raises(FileNotFoundError, match="prepare-data"):
        open_dataset(_data(tmp_path / "missing.bin"), vocab_size=256)


# ---- sampler ----
def test_sampler_deterministic_and_windows_match_tokens():
    ds = _ds(1000)
    a, b = BatchSampler(1000, 9, 8, seed=1), BatchSampler(1000, 9, 8, seed=1)
    for step in (0, 3, 50):
        assert np.array_equal(a.global_starts(step), b.global_starts(step))
    assert not np.array_equal(a.global_starts(0), BatchSampler(1000, 9, 8, seed=2).global_starts(0))
    batch = a.local_batch(ds, 3, 0, 1)
    assert batch.dtype == torch.int64 and batch.shape == (8, 10)
    starts = a.global_starts(3)
    assert np.all(starts % 10 == 0) and np.all(starts + 10 <= 1000)
    assert torch.equal(batch, torch.from_numpy(starts[:, None] + np.arange(10)))


@pytest.mark.parametrize("n_shards", [1, 2, 4, 8])
def test_shards_union_is_global_batch(n_shards):
    ds = _ds(5000)
    sampler = BatchSampler(5000, 15, 16, seed=7)
    for step in (0, 1, 40):
        shards = [BatchSampler(5000, 15, 16, seed=7).local_batch(ds, step, i, n_shards) for i in range(n_shards)]
        assert all(s.shape == (16 // n_shards, 16) for s in shards)
        assert torch.equal(torch.cat(shards), sampler.local_batch(ds, step, 0, 1))


@pytest.mark.parametrize("global_batch", [4, 7, 25])
def test_epochs_chain_and_cover_every_window(global_batch):
    sampler = BatchSampler(10 * 6 + 3, 5, global_batch, seed=3)  # 10 windows of 6, 3 tokens left over
    assert sampler.n_windows == 10
    seq = np.concatenate([sampler.global_starts(s) for s in range(10)])  # 10 * G windows, in order
    epochs = seq[: len(seq) // 10 * 10].reshape(-1, 10)
    for epoch in epochs:
        assert sorted(epoch.tolist()) == list(range(0, 60, 6))  # each epoch: every window once
    assert not all(np.array_equal(epochs[0], e) for e in epochs[1:])  # reshuffled per epoch


def test_resume_equals_uninterrupted():
    ds = _ds(3000)
    run = BatchSampler(3000, 31, 12, seed=11)
    uninterrupted = [run.local_batch(ds, s, 1, 3) for s in range(20)]
    resumed = BatchSampler(3000, 31, 12, seed=11)
    resumed.load_state_dict(json.loads(json.dumps(run.state_dict())))  # survives a JSON round trip
    assert all(torch.equal(resumed.local_batch(ds, s, 1, 3), uninterrupted[s]) for s in range(13, 20))


@pytest.mark.parametrize("key,setting", [("seed", "train.seed"), ("seq_len", "train.seq_len"),
                                         ("global_batch_size", "train.global_batch_size"),
                                         ("n_tokens", "data.path")])
def test_resume_mismatch_names_setting(key, setting):
    state = BatchSampler(3000, 31, 12, seed=11).state_dict()
    state[key] += 1
    with pytest.raises(ValueError, match=setting):
        BatchSampler(3000, 31, 12, seed=11).load_state_dict(state)
    del state[key]
    with pytest.raises(ValueError, match="lacks"):
        BatchSampler(3000, 31, 12, seed=11).load_state_dict(state)


def test_sampler_errors():
    sampler = BatchSampler(1000, 9, 6, seed=0)
    with pytest.raises(ValueError, match="make train.global_batch_size a multiple of 4"):
        sampler.local_batch(_ds(1000), 0, 0, 4)
    with pytest.raises(ValueError, match="built for 1000 tokens"):
        sampler.local_batch(_ds(999), 0, 0, 1)
    with pytest.raises(ValueError, match="lower train.seq_len"):
        BatchSampler(100, 100, 6, seed=0)


def test_corpus_batches_are_byte_text():
    train = open_dataset(_data(val_fraction=0.01), vocab_size=256).split("train")
    batch = BatchSampler(len(train), 64, 4, seed=1234).local_batch(train, 0, 0, 1)
    assert batch.shape == (4, 65) and int(batch.max()) < 256
    text = ByteTokenizer().decode(batch.flatten())
    assert text.count(" ") > 20 and text.isascii()  # English prose
