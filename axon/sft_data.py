"""Instruction (SFT) data: conversations rendered, loss-masked and packed into fixed rows.

    axon prepare-data sft chat.jsonl --tokenizer tok/tokenizer.json --seq-len 2048 --out data/chat
    (or python -m axon.sft_data ...)
    axon train data.path=data/chat train.seq_len=2048 ...

Input: JSONL lines {"prompt": str, "response": str} or {"messages": [{"role", "content"}, ...]}
(a prompt/response pair is the conversation [user: prompt, assistant: response]).

Rendering (`render`): with the tokenizer's chat template (tokenizer_config.json next to the
tokenizer.json, axon/chat_template.py), the text is cut at each assistant turn by rendering the
conversation up to it with add_generation_prompt=True and up to its end; each piece is encoded on
its own (no special tokens added: the template writes them), and only the assistant pieces (the
reply and what the template closes it with, e.g. the end-of-turn token) are trained on. Without
a chat template (the byte tokenizer, a tokenizer.json without one, or --rendering plain) the plain
rendering is [bos if add_bos] + each message's content, every assistant message followed by the
end-of-document token; only the assistant contents and their end-of-document tokens are trained on.

Packing (`pack`): documents (one conversation each, at most seq_len + 1 tokens) fill rows of
seq_len + 1 tokens in input order (next fit), never split across rows; a longer document is dropped
(`--overlong drop`, default) or cut to the row (`truncate`), and counted. The rest of a row is
padding (the end-of-document token, or 0), not trained on, with positions of its own. Positions
restart at 0 for each document; the model derives from them that attention stays within each
document (axon/model.py). The first token of a document is never a target (nothing before it in
its document predicts it).

On disk, for --out data/chat (each written under a temporary name, fsynced and renamed, the
sidecar last):
  data/chat.bin       tokens     [rows, seq_len + 1] uint16 | uint32 (row-major, raw)
  data/chat.mask.bin  loss mask  [rows, seq_len + 1] uint8: 1 = the token is a training target
  data/chat.pos.bin   positions  [rows, seq_len + 1] uint16 | uint32 (restart at 0 per document)
  data/chat.json      {"format": "packed-sft", "version": 1, "seq_len", "rows", "dtype",
                       "positions_dtype", "tokenizer", "tokenizer_sha256", "vocab_size",
                       "max_token_id", "n_tokens" (= rows * (seq_len + 1)), "eot_id", "pad_id",
                       "rendering" (chat_template | plain), "documents", "dropped", "truncated",
                       "overlong", "loss_tokens", "files", "sources", "source_sha256"}

Training (`open_packed`, `PackedSampler`, `microbatches`): data.path pointing at it makes the
trainer sample whole rows: row r of the training split is window r of a `BatchSampler` over
rows * (seq_len + 1) tokens, so a step's rows are a function of (seed, seq_len, global batch,
step) only and shard i of n takes the contiguous slice i, as for token data. The last
data.val_fraction of the rows are held out. Targets not trained on become IGNORE_INDEX
(parallel/loss_mask.py) and the loss is divided by the global count of kept targets.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from argparse import Namespace
from typing import Any, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from axon.errors import Parser, guarded
from axon.tokenizer import HFTokenizer, Tokenizer, load_tokenizer
from parallel.loss_mask import kept

FORMAT = "packed-sft"
VERSION = 1
OVERLONG = ("drop", "truncate")
RENDERINGS = ("auto", "plain")  # auto: the chat template when the tokenizer has one


# ---- rendering ----

def conversation(record: Any, where: str) -> list[dict[str, str]]:
    """A JSONL record as a list of messages (see the module doc)."""
    if isinstance(record, dict) and isinstance(record.get("messages"), list):
        msgs = record["messages"]
        for i, m in enumerate(msgs):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise ValueError(f"{where}: message {i} needs string 'role' and 'content' fields")
        if not any(m["role"] == "assistant" for m in msgs):
            raise ValueError(f"{where}: no assistant message (nothing to train on)")
        return [{"role": m["role"], "content": m["content"]} for m in msgs]
    if isinstance(record, dict) and isinstance(record.get("prompt"), str) and isinstance(record.get("response"), str):
        return [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["response"]}]
    raise ValueError(f"{where}: expected {{\"prompt\", \"response\"}} strings or a \"messages\" list")


def segments(tok: Tokenizer, messages: Sequence[dict[str, str]]) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, trained) pieces, in order (chat template only)."""
    chat = tok.chat
    out: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = chat.render(messages[:i], add_generation_prompt=True)
        full = chat.render(messages[:i + 1])
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise ValueError(f"the chat template of {tok.name} does not render conversations as prefixes of "
                             f"longer ones, so assistant turns cannot be located; pass --rendering plain")
        out += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    whole = chat.render(messages)
    if not whole.startswith(done):
        raise ValueError(f"the chat template of {tok.name} renders the whole conversation differently from "
                         f"its prefixes; pass --rendering plain")
    out.append((whole[len(done):], False))
    return [(text, trained) for text, trained in out if text]


def render(tok: Tokenizer, messages: Sequence[dict[str, str]], plain: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """One conversation -> token ids [n] int64 and loss mask [n] bool (True = trained target);
    with the chat template unless there is none or `plain`."""
    ids: list[np.ndarray] = []
    mask: list[np.ndarray] = []

    def add(piece: np.ndarray, trained: bool) -> None:
        ids.append(np.asarray(piece, dtype=np.int64))
        mask.append(np.full(len(piece), trained, dtype=bool))

    if tok.chat is not None and not plain:
        for text, trained in segments(tok, messages):
            add(tok.encode(text), trained)
    else:
        if tok.eot_id is None:
            raise ValueError(f"tokenizer {tok.name} has no chat template and no end-of-document token; name one "
                             f"with --eot-token")
        if tok.add_bos:
            add(np.array([tok.bos_id]), False)
        for m in messages:
            trained = m["role"] == "assistant"
            add(tok.encode(m["content"]), trained)
            if trained:
                add(np.array([tok.eot_id]), True)
    toks, keep = np.concatenate(ids), np.concatenate(mask)  # [n]
    if len(keep):
        keep[0] = False  # nothing before a document's first token predicts it
    return toks, keep


# ---- packing ----

@dataclass
class Packed:
    tokens: np.ndarray  # [rows, seq_len + 1] int64
    mask: np.ndarray  # [rows, seq_len + 1] bool
    positions: np.ndarray  # [rows, seq_len + 1] int64
    documents: int  # packed
    dropped: int  # longer than a row (overlong=drop) or left with no trained token
    truncated: int


def pack(docs: Iterable[tuple[np.ndarray, np.ndarray]], seq_len: int, pad_id: int,
         overlong: str = "drop") -> Packed:
    """Documents (ids [n], mask [n]) into rows of seq_len + 1 tokens (see the module doc)."""
    if overlong not in OVERLONG:
        raise ValueError(f"--overlong {overlong!r} must be one of {', '.join(OVERLONG)}")
    row_len = seq_len + 1
    rows_t: list[np.ndarray] = []
    rows_m: list[np.ndarray] = []
    rows_p: list[np.ndarray] = []
    cur: list[tuple[np.ndarray, np.ndarray]] = []
    used = n_docs = dropped = truncated = 0

    def flush() -> None:
        nonlocal cur, used
        if not cur:
            return
        pad = row_len - used
        rows_t.append(np.concatenate([d for d, _ in cur] + [np.full(pad, pad_id, dtype=np.int64)]))
        rows_m.append(np.concatenate([m for _, m in cur] + [np.zeros(pad, dtype=bool)]))
        rows_p.append(np.concatenate([np.arange(len(d)) for d, _ in cur] + [np.arange(pad)]))
        cur, used = [], 0

    for ids, mask in docs:
        if len(ids) > row_len:
            if overlong == "drop":
                dropped += 1
                continue
            ids, mask = ids[:row_len], mask[:row_len]
            truncated += 1
        if not mask.any():
            dropped += 1
            continue
        if used + len(ids) > row_len:
            flush()
        cur.append((ids, mask))
        used += len(ids)
        n_docs += 1
    flush()
    if not rows_t:
        raise ValueError(f"no document fits a row of train.seq_len + 1 = {row_len} tokens with a trained token "
                         f"({dropped} dropped); raise --seq-len or use --overlong truncate")
    return Packed(np.stack(rows_t), np.stack(rows_m), np.stack(rows_p), n_docs, dropped, truncated)


# ---- writing ----

def paths(out: Path) -> dict[str, Path]:
    """The files of a packed dataset with output prefix (or .bin / .json path) `out`."""
    stem = out.with_suffix("") if out.suffix in (".bin", ".json") else out
    return {"tokens": stem.with_name(stem.name + ".bin"), "loss_mask": stem.with_name(stem.name + ".mask.bin"),
            "positions": stem.with_name(stem.name + ".pos.bin"), "sidecar": stem.with_name(stem.name + ".json")}


def _write_atomic(path: Path, data: bytes) -> None:
    """`data` to `<path>.tmp-<pid>`, fsynced, renamed onto `path`, the directory fsynced."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _uint(n_values: int) -> type:
    return np.uint16 if n_values <= 2**16 else np.uint32


def _records(inputs: Sequence[Path], sha: "hashlib._Hash") -> Iterator[tuple[Any, str]]:
    for path in inputs:
        if path.suffix != ".jsonl" or not path.is_file():
            raise ValueError(f"input {path}: give existing .jsonl files of prompt/response or messages records")
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                sha.update(line)
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    yield json.loads(line.decode("utf-8")), where
                except (UnicodeDecodeError, json.JSONDecodeError) as e:
                    raise ValueError(f"{where}: not UTF-8 JSON ({e})") from None


def prepare(inputs: Sequence[Path], out: Path, tokenizer: str, seq_len: int, overlong: str = "drop",
            eot_token: Optional[str] = None, rendering: str = "auto") -> dict[str, Any]:
    """Render, mask and pack `inputs` into the files of `paths(out)`; returns the sidecar's contents."""
    if seq_len < 1:
        raise ValueError(f"--seq-len {seq_len} must be >= 1 (train.seq_len)")
    if rendering not in RENDERINGS:
        raise ValueError(f"--rendering {rendering!r} must be one of {', '.join(RENDERINGS)}")
    tok = load_tokenizer(tokenizer, eot_token=eot_token)
    plain = rendering == "plain" or tok.chat is None
    sha = hashlib.sha256()
    docs = (render(tok, conversation(rec, where), plain) for rec, where in _records(inputs, sha))
    pad_id = tok.eot_id if tok.eot_id is not None else 0
    packed = pack(docs, seq_len, pad_id, overlong)
    dtype, pos_dtype = _uint(tok.vocab_size), _uint(seq_len + 1)
    files = paths(out)
    files["tokens"].parent.mkdir(parents=True, exist_ok=True)
    rows = packed.tokens.shape[0]
    meta = {
        "format": FORMAT, "version": VERSION, "seq_len": seq_len, "rows": rows,
        "dtype": np.dtype(dtype).name, "positions_dtype": np.dtype(pos_dtype).name,
        "tokenizer": tok.name, "tokenizer_sha256": tok.sha256 if isinstance(tok, HFTokenizer) else None,
        "vocab_size": tok.vocab_size, "max_token_id": int(packed.tokens.max()), "n_tokens": rows * (seq_len + 1),
        "eot_id": tok.eot_id, "pad_id": pad_id, "rendering": "plain" if plain else "chat_template",
        "documents": packed.documents, "dropped": packed.dropped, "truncated": packed.truncated,
        "overlong": overlong, "loss_tokens": int(packed.mask.sum()),
        "files": {k: files[k].name for k in ("tokens", "loss_mask", "positions")},
        "sources": [str(p) for p in inputs], "source_sha256": sha.hexdigest(),
    }
    _write_atomic(files["tokens"], packed.tokens.astype(dtype).tobytes())
    _write_atomic(files["loss_mask"], packed.mask.astype(np.uint8).tobytes())
    _write_atomic(files["positions"], packed.positions.astype(pos_dtype).tobytes())
    _write_atomic(files["sidecar"], (json.dumps(meta, indent=2) + "\n").encode())
    return meta


def parse_args(argv: list[str]) -> "Namespace":
    p = Parser(prog="axon prepare-data sft", description=__doc__.split("\n\n")[0])
    p.add_argument("inputs", nargs="+", type=Path, help=".jsonl files of prompt/response or messages records")
    p.add_argument("--out", required=True, type=Path, help="output prefix: <out>.bin, .mask.bin, .pos.bin, .json")
    p.add_argument("--tokenizer", default="byte", help="'byte' or a tokenizer.json (its tokenizer_config.json "
                                                       "next to it gives the chat template)")
    p.add_argument("--seq-len", required=True, type=int, help="train.seq_len of the runs using it (rows hold +1)")
    p.add_argument("--overlong", default="drop", choices=OVERLONG, help="documents longer than a row")
    p.add_argument("--eot-token", default=None, help="end-of-document token of a tokenizer.json")
    p.add_argument("--rendering", default="auto", choices=RENDERINGS,
                   help="auto: the tokenizer's chat template if it has one; plain: contents + end-of-document")
    p.add_argument("--debug", action="store_true", help="print the full traceback of an error")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    """`axon prepare-data sft ...`: errors as one line naming the option (axon/errors.py)."""
    return guarded("axon prepare-data sft", _main, argv)


def _main(argv: list[str]) -> int:
    args = parse_args(argv)
    meta = prepare(args.inputs, args.out, args.tokenizer, args.seq_len, args.overlong, args.eot_token,
                   args.rendering)
    print(f"wrote {meta['rows']:,} rows of {args.seq_len + 1} tokens ({meta['documents']:,} documents, "
          f"{meta['loss_tokens']:,} trained tokens; {meta['dropped']} dropped, {meta['truncated']} truncated) "
          f"to {paths(args.out)['sidecar']}")
    return 0


# ---- training ----

@dataclass(frozen=True)
class PackedDataset:
    """Rows of a packed-sft dataset (np.memmap views, flat: row r is [r*(S+1), (r+1)*(S+1)))."""

    name: str
    tokens: np.ndarray  # [rows * (S+1)]
    mask: np.ndarray  # [rows * (S+1)] uint8
    positions: np.ndarray  # [rows * (S+1)]
    seq_len: int
    val_fraction: float

    @property
    def rows(self) -> int:
        return len(self) // (self.seq_len + 1)

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def split(self, which: str) -> "PackedDataset":
        """`train`: all but the last round(rows * val_fraction) rows; `val`: those."""
        n_val = int(round(self.rows * self.val_fraction))
        cut = (self.rows - n_val) * (self.seq_len + 1)
        if which == "val" and n_val == 0:
            raise ValueError(f"dataset {self.name!r} has no validation rows at data.val_fraction="
                             f"{self.val_fraction}; raise data.val_fraction")
        if which not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {which!r}")
        part = slice(0, cut) if which == "train" else slice(cut, None)
        return PackedDataset(f"{self.name}:{which}", self.tokens[part], self.mask[part], self.positions[part],
                             self.seq_len, 0.0)


def open_packed(data: Any, seq_len: int, vocab_size: int) -> Optional[PackedDataset]:
    """The packed dataset data.path names, or None when it is not one (plain token data)."""
    if data.path is None:
        return None
    files = paths(Path(str(data.path)).expanduser())
    side = files["sidecar"]
    try:
        meta = json.loads(side.read_text()) if side.is_file() else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None  # not ours: axon/data.py reports the unreadable sidecar
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        return None
    where = f"data.path={data.path!r}"
    if meta.get("version") != VERSION:
        raise ValueError(f"{where}: packed-sft version {meta.get('version')!r}, expected {VERSION}; prepare it again")
    if meta["seq_len"] != seq_len:
        raise ValueError(f"{where} was packed for train.seq_len={meta['seq_len']}, this run has {seq_len}; set "
                         f"train.seq_len={meta['seq_len']} or prepare it again with --seq-len {seq_len}")
    if meta["max_token_id"] >= vocab_size:
        raise ValueError(f"{where} holds token id {meta['max_token_id']} but model.vocab_size={vocab_size}; set "
                         f"model.vocab_size to at least {meta['max_token_id'] + 1}")
    n = meta["rows"] * (seq_len + 1)
    arrays = []
    for key, dtype in (("tokens", meta["dtype"]), ("loss_mask", "uint8"), ("positions", meta["positions_dtype"])):
        path = side.with_name(meta["files"][key])
        if not path.is_file() or path.stat().st_size != n * np.dtype(dtype).itemsize:
            raise ValueError(f"{where}: {path} is missing or not {meta['rows']} rows of {seq_len + 1} {dtype}; "
                             f"prepare it again")
        arrays.append(np.memmap(path, dtype=dtype, mode="r", shape=(n,)))
    return PackedDataset(getattr(data, "name", str(data.path)), *arrays, seq_len=seq_len,
                         val_fraction=data.val_fraction)


@dataclass(frozen=True)
class PackedBatch:
    tokens: torch.Tensor  # [B, S+1] int64
    keep: torch.Tensor  # [B, S] bool: target j (token j+1) is trained on
    positions: torch.Tensor  # [B, S+1] int64, restarting at 0 per document


class PackedSampler:
    """Whole rows: row r is window r of a BatchSampler over rows * (S+1) tokens (same order,
    sharding, state and resume rules)."""

    def __init__(self, n_tokens: int, seq_len: int, global_batch_size: int, seed: int):
        from axon.data import BatchSampler
        self.inner = BatchSampler(n_tokens, seq_len, global_batch_size, seed)

    def local_batch(self, dataset: PackedDataset, step: int, shard: int, n_shards: int) -> PackedBatch:
        """Shard `shard` of `n_shards` of the global batch of `step`."""
        tokens = self.inner.local_batch(dataset, step, shard, n_shards)  # [B, S+1], checks the sharding
        per_shard = self.inner.global_batch_size // n_shards
        starts = self.inner.global_starts(step)[shard * per_shard:(shard + 1) * per_shard]  # [B]
        idx = starts[:, None] + np.arange(self.inner.window, dtype=np.int64)[None, :]  # [B, S+1]
        mask = torch.from_numpy(np.asarray(dataset.mask[idx], dtype=np.bool_))  # [B, S+1]
        pos = torch.from_numpy(np.asarray(dataset.positions[idx], dtype=np.int64))  # [B, S+1]
        same_doc = pos[:, 1:] == pos[:, :-1] + 1  # [B, S]: target j continues token j's document
        return PackedBatch(tokens, mask[:, 1:] & same_doc, pos)

    def state_dict(self) -> dict[str, int]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.inner.load_state_dict(state)


def microbatches(batch: PackedBatch, ctx: Any, micro_batch_size: int, device: torch.device, goldfish_cfg: Any,
                 group: Any) -> tuple[list, int]:
    """This rank's microbatches (inputs [mbs, S/cp], masked targets [mbs, S/cp], per-sample
    positions [mbs, S/cp]) and the global count of kept targets (one all-reduce over `group`, the
    data group, whose ranks hold disjoint tokens)."""
    from axon import goldfish
    keep = batch.keep
    if goldfish_cfg.k:  # the Goldfish mask on top of the prompt mask
        keep = keep & goldfish.keep_mask(batch.tokens, goldfish_cfg)
    out, count = [], torch.zeros((), dtype=torch.int64, device=device)
    for t, k, p in zip(*(x.split(micro_batch_size) for x in (batch.tokens, keep, batch.positions))):
        inputs, targets, positions = ctx.shard_packed(t.to(device), k.to(device), p.to(device))
        out.append((inputs, targets, positions))
        count += kept(targets).sum()
    if group.size > 1:
        dist.all_reduce(count, group=group.group)
    return out, max(int(count), 1)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
