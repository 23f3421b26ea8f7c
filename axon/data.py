"""Training data: token datasets and the batch sampler.

    ds = open_dataset(cfg.data, vocab_size=cfg.model.vocab_size)     # TokenDataset
    train, val = ds.split("train"), ds.split("val")
    sampler = BatchSampler(len(train), seq_len, global_batch_size, seed)
    batch = sampler.local_batch(train, step, shard, n_shards)        # LongTensor [G/n_shards, S+1]
    inputs, targets = batch[:, :-1], batch[:, 1:]

A dataset is either the embedded corpus (`data.path=null`: Jane Austen's novels in
axon/corpus/, byte-tokenized once per process and cached in memory) or a `.bin` token file
(raw uint16/uint32 tokens, the nanoGPT/Megatron format) with a `.json` sidecar written by
`axon prepare-data`, opened with np.memmap.

The sampler cuts the tokens into non-overlapping windows of seq_len + 1 tokens, shuffles the
windows once per epoch (generator seeded by (seed, epoch)) and deals them out in order, epochs
chained. The global batch of step k is a function of (seed, seq_len, global_batch_size, k)
only, and shard i of n takes the contiguous slice i of it: any number of data-parallel shards
sees the same global batch, and resuming at step k needs nothing but k.
"""
from __future__ import annotations

import functools
import gzip
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from axon.config import Data
from axon.tokenizer import ByteTokenizer

CORPUS_DIR = Path(__file__).resolve().parent / "corpus"
DTYPES = {"uint16": np.uint16, "uint32": np.uint32}


@dataclass(frozen=True)
class TokenDataset:
    """A flat array of token ids; documents are separated by `eot_id`."""

    name: str
    tokens: np.ndarray  # [n_tokens] uint8 | uint16 | uint32 (np.memmap for .bin files)
    tokenizer: str  # "byte" or the tokenizer.json it was made with
    eot_id: Optional[int]
    val_fraction: float  # the last val_fraction of the tokens are the validation split

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def split(self, which: str) -> "TokenDataset":
        """`train`: all but the last `val_fraction` of the tokens; `val`: that held-out tail."""
        n_val = int(round(len(self) * self.val_fraction))
        if which == "train":
            part = self.tokens[: len(self) - n_val]
        elif which == "val":
            if n_val == 0:
                raise ValueError(f"dataset {self.name!r} has no validation split: data.val_fraction="
                                 f"{self.val_fraction} holds out 0 of {len(self)} tokens; raise data.val_fraction")
            part = self.tokens[len(self) - n_val:]
        else:
            raise ValueError(f"split must be 'train' or 'val', got {which!r}")
        return replace(self, name=f"{self.name}:{which}", tokens=part, val_fraction=0.0)


def open_dataset(data: Data, vocab_size: int) -> TokenDataset:
    """Open `data` (the frozen `data` config) for a model with `vocab_size` embeddings."""
    if not 0.0 <= data.val_fraction < 1.0:
        raise ValueError(f"data.val_fraction must be in [0, 1), got {data.val_fraction}")
    if data.path is None:
        ds = _embedded_corpus(data)
        max_id = _corpus_tokens()[1]
    else:
        ds, max_id = _token_file(data)
    if max_id >= vocab_size:
        raise ValueError(f"dataset {ds.name!r} holds token id {max_id} but model.vocab_size={vocab_size}; "
                         f"set model.vocab_size to at least {max_id + 1} (the tokenizer's vocabulary size)")
    return ds


def _embedded_corpus(data: Data) -> TokenDataset:
    if data.tokenizer != "byte":
        raise ValueError(f"data.path=null selects the embedded corpus, which is byte-tokenized, but "
                         f"data.tokenizer={data.tokenizer!r}: set data.tokenizer=byte, or point data.path at a "
                         f".bin made by `axon prepare-data`")
    if data.dtype not in ("auto", "uint16", "uint32"):
        raise ValueError(f"data.dtype must be auto, uint16 or uint32, got {data.dtype!r}")
    tokens, _ = _corpus_tokens()
    return TokenDataset(name=data.name, tokens=tokens, tokenizer="byte", eot_id=ByteTokenizer.eot_id,
                        val_fraction=data.val_fraction)


@functools.lru_cache(maxsize=1)
def _corpus_tokens() -> tuple[np.ndarray, int]:
    """The embedded corpus, byte-tokenized: every novel followed by the end-of-document byte.
    Returns (tokens [n] uint8, read-only; largest token id)."""
    files = sorted(CORPUS_DIR.glob("*.txt.gz"))
    if not files:
        raise FileNotFoundError(f"no embedded corpus files (*.txt.gz) in {CORPUS_DIR}; reinstall axon")
    eot = bytes([ByteTokenizer.eot_id])
    raw = b"".join(gzip.decompress(f.read_bytes()) + eot for f in files)
    tokens = np.frombuffer(raw, dtype=np.uint8)  # [n_bytes], read-only view of `raw`
    return tokens, int(tokens.max())


def sidecar_path(bin_path: Path) -> Path:
    return bin_path.with_suffix(".json")


def _token_file(data: Data) -> tuple[TokenDataset, int]:
    path = Path(data.path).expanduser()
    if path.suffix != ".bin":
        path = path.with_name(path.name + ".bin")  # data.path may be given without the suffix
    if not path.is_file():
        raise FileNotFoundError(f"data.path={data.path!r}: no such token file {path} "
                                f"(make one with `axon prepare-data`)")
    meta: dict[str, Any] = {}
    if sidecar_path(path).is_file():
        meta = json.loads(sidecar_path(path).read_text())
    dtype_name = _dtype_name(data, meta, path)
    itemsize = np.dtype(DTYPES[dtype_name]).itemsize
    size = path.stat().st_size
    if size % itemsize:
        raise ValueError(f"{path} is {size} bytes, not a whole number of {dtype_name} tokens; check data.dtype")
    n_tokens = size // itemsize
    if "n_tokens" in meta and meta["n_tokens"] != n_tokens:
        raise ValueError(f"{path} holds {n_tokens} tokens but its sidecar {sidecar_path(path)} says "
                         f"{meta['n_tokens']}: the file is truncated or stale; run `axon prepare-data` again")
    if n_tokens == 0:
        raise ValueError(f"{path} holds no tokens; point data.path at a non-empty token file")
    tokens = np.memmap(path, dtype=DTYPES[dtype_name], mode="r", shape=(n_tokens,))
    max_id = int(meta["max_token_id"]) if "max_token_id" in meta else int(tokens.max())
    ds = TokenDataset(name=data.name, tokens=tokens, tokenizer=meta.get("tokenizer", data.tokenizer),
                      eot_id=meta.get("eot_id"), val_fraction=data.val_fraction)
    return ds, max_id


def _dtype_name(data: Data, meta: dict[str, Any], path: Path) -> str:
    if data.dtype not in ("auto", *DTYPES):
        raise ValueError(f"data.dtype must be auto, uint16 or uint32, got {data.dtype!r}")
    if "dtype" in meta:
        if data.dtype not in ("auto", meta["dtype"]):
            raise ValueError(f"data.dtype={data.dtype} but {sidecar_path(path)} says {meta['dtype']}; "
                             f"set data.dtype=auto")
        return str(meta["dtype"])
    if data.dtype != "auto":
        return data.dtype
    raise ValueError(f"{path} has no sidecar {sidecar_path(path).name} to tell its token type; "
                     f"set data.dtype=uint16 or data.dtype=uint32")


class BatchSampler:
    """Deterministic, resumable, layout-independent batches of windows of seq_len + 1 tokens."""

    def __init__(self, n_tokens: int, seq_len: int, global_batch_size: int, seed: int):
        if seq_len < 1:
            raise ValueError(f"train.seq_len must be >= 1, got {seq_len}")
        if global_batch_size < 1:
            raise ValueError(f"train.global_batch_size must be >= 1, got {global_batch_size}")
        self.n_tokens, self.seq_len, self.global_batch_size, self.seed = n_tokens, seq_len, global_batch_size, seed
        self.window = seq_len + 1
        self.n_windows = n_tokens // self.window
        if self.n_windows == 0:
            raise ValueError(f"the dataset has {n_tokens} tokens, fewer than one window of train.seq_len + 1 = "
                             f"{self.window}; lower train.seq_len or use more data")
        self._perms: dict[int, np.ndarray] = {}  # epoch -> window order; the last two epochs kept

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) >= 2:
                del self._perms[min(self._perms)]
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
        return self._perms[epoch]

    def global_starts(self, step: int) -> np.ndarray:
        """Token offsets [G] of the windows that make up the global batch of `step`."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        idx = step * self.global_batch_size + np.arange(self.global_batch_size, dtype=np.int64)  # [G]
        epochs, pos = np.divmod(idx, self.n_windows)
        order = np.empty_like(idx)
        for e in np.unique(epochs):
            sel = epochs == e
            order[sel] = self._perm(int(e))[pos[sel]]
        return order * self.window

    def local_batch(self, dataset: TokenDataset, step: int, shard: int, n_shards: int) -> torch.Tensor:
        """Shard `shard` of `n_shards` of the global batch of `step`: LongTensor [G / n_shards, seq_len + 1]."""
        if len(dataset) != self.n_tokens:
            raise ValueError(f"the sampler was built for {self.n_tokens} tokens but dataset {dataset.name!r} "
                             f"has {len(dataset)}")
        if self.global_batch_size % n_shards:
            raise ValueError(f"train.global_batch_size={self.global_batch_size} is not divisible by the "
                             f"{n_shards} data shards; make train.global_batch_size a multiple of {n_shards}")
        if not 0 <= shard < n_shards:
            raise ValueError(f"shard {shard} out of range for {n_shards} shards")
        per_shard = self.global_batch_size // n_shards
        starts = self.global_starts(step)[shard * per_shard:(shard + 1) * per_shard]  # [B]
        idx = starts[:, None] + np.arange(self.window, dtype=np.int64)[None, :]  # [B, S+1]
        return torch.from_numpy(np.asarray(dataset.tokens[idx], dtype=np.int64))  # [B, S+1]

    # The sampler has no position of its own (the trainer passes the step); its state is what a
    # resumed run must agree on for step k to mean the same batch.
    _SETTINGS = {"seed": "train.seed", "seq_len": "train.seq_len", "global_batch_size": "train.global_batch_size",
                 "n_tokens": "data.path / data.val_fraction (the training split's token count)"}

    def state_dict(self) -> dict[str, int]:
        return {k: int(getattr(self, k)) for k in self._SETTINGS}

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key, setting in self._SETTINGS.items():
            if key not in state:
                raise ValueError(f"sampler state lacks {key!r}: the checkpoint is not an axon sampler state")
            if int(state[key]) != getattr(self, key):
                raise ValueError(f"resumed run changes {setting}: the checkpoint has {key}={state[key]}, "
                                 f"this run {getattr(self, key)}; set it back or start a fresh run "
                                 f"(checkpoint.resume=never)")
