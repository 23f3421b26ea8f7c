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

`inspect(data)` reads what a dataset is (path, token type, token count, largest token id) and
checks the files without loading the tokens; `open_dataset` (the workers), and `axon train`'s
pre-spawn check (axon/preflight.py) both use it, with `check_vocab`, `check_batch` and
`check_sampler_state`, so each data rule has one home.
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
class DataInfo:
    """A dataset as `inspect` found it, its tokens not loaded."""

    name: str
    path: Optional[Path]  # the .bin file; None = the embedded corpus
    dtype: str  # uint8 (the corpus) | uint16 | uint32
    n_tokens: int
    max_token_id: int
    meta: dict[str, Any]  # the .json sidecar ({} for the corpus)
    val_fraction: float

    @property
    def train_tokens(self) -> int:
        return train_tokens(self.n_tokens, self.val_fraction)


def train_tokens(n_tokens: int, val_fraction: float) -> int:
    """Tokens of the training split: all but the last `val_fraction` (rounded)."""
    return n_tokens - int(round(n_tokens * val_fraction))


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
        n_val = len(self) - train_tokens(len(self), self.val_fraction)
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
    info = inspect(data)
    check_vocab(info, vocab_size)
    if info.path is None:
        return TokenDataset(name=data.name, tokens=_corpus_tokens()[0], tokenizer="byte",
                            eot_id=ByteTokenizer.eot_id, val_fraction=data.val_fraction)
    tokens = np.memmap(info.path, dtype=DTYPES[info.dtype], mode="r", shape=(info.n_tokens,))
    return TokenDataset(name=data.name, tokens=tokens, tokenizer=info.meta.get("tokenizer", data.tokenizer),
                        eot_id=info.meta.get("eot_id"), val_fraction=data.val_fraction)


def inspect(data: Data) -> DataInfo:
    """What `data` holds, checked (the files exist, sizes agree with the sidecar, a token id bound
    is known), without loading the tokens (a token file without a sidecar max_token_id is scanned)."""
    if data.path is None:
        if data.tokenizer != "byte":
            raise ValueError(f"data.path=null selects the embedded corpus, which is byte-tokenized, but "
                             f"data.tokenizer={data.tokenizer!r}: set data.tokenizer=byte, or point data.path at a "
                             f".bin made by `axon prepare-data`")
        tokens, max_id = _corpus_tokens()
        return DataInfo(data.name, None, "uint8", len(tokens), max_id, {}, data.val_fraction)
    path = token_path(data)
    meta = _sidecar(data, path)
    dtype_name = _dtype_name(data, meta, path)
    n_tokens = _token_count(data, path, dtype_name, meta)
    max_id = _max_token_id(data, path, dtype_name, n_tokens, meta)
    return DataInfo(data.name, path, dtype_name, n_tokens, max_id, meta, data.val_fraction)


def check_vocab(info: DataInfo, vocab_size: int) -> None:
    """Every token id of the dataset must have an embedding."""
    if info.max_token_id >= vocab_size:
        raise ValueError(f"dataset {info.name!r} holds token id {info.max_token_id} but model.vocab_size={vocab_size}; "
                         f"set model.vocab_size to at least {info.max_token_id + 1} (the tokenizer's vocabulary size)")


def check_batch(info: DataInfo, seq_len: int, global_batch_size: int) -> None:
    """The training split must hold one global batch of distinct windows of seq_len + 1 tokens."""
    need = global_batch_size * (seq_len + 1)
    if info.train_tokens < need:
        raise ValueError(f"data.path={_shown(info)} has {info.train_tokens:,} training tokens, fewer than one global "
                         f"batch of train.global_batch_size x (train.seq_len + 1) = {need:,}; lower "
                         f"train.global_batch_size or train.seq_len, or use more data")


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


def _shown(info: DataInfo) -> str:
    return "null (the embedded corpus)" if info.path is None else str(info.path)


def token_path(data: Data) -> Path:
    """data.path as the .bin file (the suffix may be left out); it must be an existing file."""
    path = Path(str(data.path)).expanduser()
    if path.suffix != ".bin":
        path = path.with_name(path.name + ".bin")  # data.path may be given without the suffix
    if Path(str(data.path)).expanduser().is_dir() or path.is_dir():
        raise IsADirectoryError(f"data.path={data.path!r} is a directory; point it at a .bin token file "
                                f"made by `axon prepare-data`")
    if not path.is_file():
        raise FileNotFoundError(f"data.path={data.path!r}: no such token file {path} "
                                f"(make one with `axon prepare-data`)")
    return path


def _sidecar(data: Data, path: Path) -> dict[str, Any]:
    side = sidecar_path(path)
    if not side.is_file():
        return {}
    try:
        meta = json.loads(side.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"data.path={data.path!r}: its sidecar {side} is unreadable ({e}); "
                         f"run `axon prepare-data` again") from None
    if not isinstance(meta, dict):
        raise ValueError(f"data.path={data.path!r}: its sidecar {side} is not a JSON object; "
                         f"run `axon prepare-data` again")
    return meta


def _token_count(data: Data, path: Path, dtype_name: str, meta: dict[str, Any]) -> int:
    itemsize = np.dtype(DTYPES[dtype_name]).itemsize
    size = path.stat().st_size
    if size % itemsize:
        raise ValueError(f"data.path={data.path!r}: {path} is {size} bytes, not a whole number of {dtype_name} "
                         f"tokens; check data.dtype")
    n_tokens = size // itemsize
    if "n_tokens" in meta and meta["n_tokens"] != n_tokens:
        raise ValueError(f"data.path={data.path!r}: {path} holds {n_tokens} tokens but its sidecar "
                         f"{sidecar_path(path)} says {meta['n_tokens']}: the file is truncated or stale; "
                         f"run `axon prepare-data` again")
    if n_tokens == 0:
        raise ValueError(f"data.path={data.path!r}: {path} holds no tokens; point data.path at a non-empty token file")
    return n_tokens


def _max_token_id(data: Data, path: Path, dtype_name: str, n_tokens: int, meta: dict[str, Any]) -> int:
    """The sidecar's max_token_id (a non-negative integer), else the largest token in the file."""
    if "max_token_id" not in meta:
        return int(np.memmap(path, dtype=DTYPES[dtype_name], mode="r", shape=(n_tokens,)).max())
    value = meta["max_token_id"]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"data.path={data.path!r}: its sidecar {sidecar_path(path)} has max_token_id={value!r}, "
                         f"not a token id (an integer >= 0); run `axon prepare-data` again")
    return value


def _dtype_name(data: Data, meta: dict[str, Any], path: Path) -> str:
    if "dtype" in meta and meta["dtype"] not in DTYPES:
        raise ValueError(f"data.path={data.path!r}: its sidecar {sidecar_path(path)} has dtype={meta['dtype']!r}, "
                         f"not one of {', '.join(DTYPES)}; run `axon prepare-data` again")
    if "dtype" in meta:
        if data.dtype not in ("auto", meta["dtype"]):
            raise ValueError(f"data.dtype={data.dtype} but {sidecar_path(path)} says {meta['dtype']}; "
                             f"set data.dtype=auto")
        return str(meta["dtype"])
    if data.dtype != "auto":
        return data.dtype
    raise ValueError(f"data.path={data.path!r}: {path} has no sidecar {sidecar_path(path).name} to tell its token "
                     f"type; set data.dtype=uint16 or data.dtype=uint32 (or run `axon prepare-data` again)")


class BatchSampler:
    """Deterministic, resumable, layout-independent batches of windows of seq_len + 1 tokens."""

    def __init__(self, n_tokens: int, seq_len: int, global_batch_size: int, seed: int):
        # seq_len, global_batch_size >= 1: their ranges are declared on axon.config.Train
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
        return sampler_state(self.seed, self.seq_len, self.global_batch_size, self.n_tokens)

    def load_state_dict(self, state: dict[str, int]) -> None:
        check_sampler_state(state, self.state_dict())


def sampler_state(seed: int, seq_len: int, global_batch_size: int, n_tokens: int) -> dict[str, int]:
    """What a resumed run must agree on for step k to mean the same batch (n_tokens: the training split's)."""
    return {"seed": int(seed), "seq_len": int(seq_len), "global_batch_size": int(global_batch_size),
            "n_tokens": int(n_tokens)}


def check_sampler_state(saved: dict[str, Any], current: dict[str, int]) -> None:
    """A checkpoint's sampler state (`saved`) against this run's: every setting must match."""
    for key, setting in BatchSampler._SETTINGS.items():
        if key not in saved:
            raise ValueError(f"sampler state lacks {key!r}: the checkpoint is not an axon sampler state")
        if int(saved[key]) != current[key]:
            raise ValueError(f"resumed run changes {setting}: the checkpoint has {key}={saved[key]}, "
                             f"this run {current[key]}; set it back or start a fresh run "
                             f"(checkpoint.resume=never)")
