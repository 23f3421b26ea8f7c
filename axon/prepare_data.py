"""`axon prepare-data`: tokenize text into a token file for training.

    axon prepare-data book1.txt book2.txt --out data/books             # byte tokenizer
    axon prepare-data web.jsonl --field text --tokenizer tok/tokenizer.json --out data/web

Each .txt file is one document; each line of a .jsonl file is one document (its `--field`).
Every document is followed by the tokenizer's end-of-document token. Writes `<out>.bin` (raw
uint16/uint32 tokens, the nanoGPT/Megatron format) and `<out>.json` (dtype, vocab_size,
n_tokens, tokenizer, source sha256, ...). Both are written under temporary names, fsynced and
renamed, the sidecar last: a failed run leaves no partial file (nor a directory it created) and any
previous output intact. The inputs and the output path are checked before anything is written.
Train on the result with `data.path=<out>.bin` (and `model.vocab_size` >= the tokenizer's).

    axon prepare-data sft chat.jsonl --tokenizer tok/tokenizer.json --seq-len 2048 --out data/chat

Instruction data (prompt/response or chat messages, loss on the responses only, packed into
rows with document boundaries kept) is axon/sft_data.py's; see `axon prepare-data sft --help`.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import BinaryIO, Iterator, Optional

import numpy as np

from axon import preflight
from axon.errors import Parser, guarded
from axon.errors import one_line
from axon.tokenizer import HFTokenizer, Tokenizer, load_tokenizer

BATCH_DOCS = 512  # documents tokenized per encode_batch call


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = Parser(prog="axon prepare-data", description=__doc__.split("\n\n")[0])
    p.add_argument("inputs", nargs="+", type=Path, help=".txt or .jsonl files, tokenized in the order given")
    p.add_argument("--out", required=True, type=Path, help="output prefix: writes <out>.bin and <out>.json")
    p.add_argument("--tokenizer", default="byte", help="'byte' or the path of a Hugging Face tokenizer.json")
    p.add_argument("--field", default="text", help="JSONL key holding the document text (default: text)")
    p.add_argument("--dtype", default="auto", choices=["auto", "uint16", "uint32"],
                   help="token type; auto = uint16 when the vocabulary fits, else uint32")
    p.add_argument("--eot-token", default=None,
                   help="end-of-document token of a tokenizer.json (default: <|endoftext|>, </s>, ... if present)")
    p.add_argument("--debug", action="store_true", help="print the full traceback of an error")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    return guarded("axon prepare-data", _main, argv)


def _main(argv: list[str]) -> int:
    if argv[:1] == ["sft"]:  # instruction data: rendered, loss-masked, packed (axon/sft_data.py)
        from axon import sft_data

        return sft_data.main(argv[1:])
    args = parse_args(argv)
    meta = prepare(args.inputs, args.out, args.tokenizer, field=args.field, dtype=args.dtype,
                   eot_token=args.eot_token)  # ValueError / OSError: one line, exit code 2 (axon/errors.py)
    print(f"wrote {meta['n_tokens']:,} tokens ({meta['n_docs']:,} documents, {meta['dtype']}, "
          f"vocabulary {meta['vocab_size']:,}) to {_bin_path(args.out)}")
    return 0


def prepare(inputs: list[Path], out: Path, tokenizer: str, field: str = "text", dtype: str = "auto",
            eot_token: Optional[str] = None) -> dict:
    """Tokenize `inputs` into `<out>.bin` + `<out>.json`; returns the sidecar's contents."""
    check_inputs(inputs)
    bin_path, json_path = _bin_path(out), _bin_path(out).with_suffix(".json")
    check_output(out, bin_path, json_path)
    tok = _tokenizer(tokenizer, eot_token)
    np_dtype = _pick_dtype(dtype, tok.vocab_size)
    made = _new_dirs(bin_path.parent)
    bin_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        return _write(inputs, bin_path, json_path, tok, np_dtype, field)
    except BaseException:
        for d in made:  # leave no directory this run created (deepest first; only if still empty)
            if d.is_dir() and not any(d.iterdir()):
                d.rmdir()
        raise


def check_inputs(inputs: list[Path]) -> None:
    """Every input is an existing, readable .txt or .jsonl file."""
    for path in inputs:
        if path.suffix not in (".txt", ".jsonl"):
            raise ValueError(f"{path}: input files must end in .txt or .jsonl")
        if path.is_dir():
            raise IsADirectoryError(f"input {path} is a directory; give the .txt or .jsonl files in it")
        if not path.is_file():
            raise FileNotFoundError(f"input {path}: no such file")
        if not os.access(path, os.R_OK):
            raise PermissionError(f"input {path} is not readable by this user")


def check_output(out: Path, bin_path: Path, json_path: Path) -> None:
    """--out names files (not directories) whose directory can be created or written."""
    for path in (bin_path, json_path):
        if path.is_dir():
            raise IsADirectoryError(f"--out {out}: {path} is a directory; give an output prefix such as data/books")
    preflight.check_writable(bin_path.parent, "--out")


def _tokenizer(spec: str, eot_token: Optional[str]) -> "Tokenizer":
    try:
        tok = load_tokenizer(spec, eot_token=eot_token)
    except (ValueError, OSError):
        raise
    except Exception as e:  # noqa: BLE001 - the tokenizers library's parse errors are plain Exceptions
        raise ValueError(f"--tokenizer {spec} is not a Hugging Face tokenizer.json ({one_line(str(e))})") from None
    if tok.eot_id is None:
        raise ValueError(f"tokenizer {spec} has none of the usual end-of-document tokens; "
                         f"name one with --eot-token")
    return tok


def _new_dirs(path: Path) -> list[Path]:
    """The directories `path.mkdir(parents=True)` would create, deepest first."""
    out = []
    while not path.exists() and path != path.parent:
        out.append(path)
        path = path.parent
    return out


def _write(inputs: list[Path], bin_path: Path, json_path: Path, tok: "Tokenizer", np_dtype: type,
           field: str) -> dict:
    sha = hashlib.sha256()
    n_tokens, n_docs, max_id = 0, 0, 0
    eot = np.array([tok.eot_id], dtype=np_dtype)
    with _AtomicFile(bin_path) as f:
        for docs in _batches(_documents(inputs, field, sha), BATCH_DOCS):
            for ids in tok.encode_batch(docs):
                f.write(ids.astype(np_dtype).tobytes())
                f.write(eot.tobytes())
                n_tokens += len(ids) + 1
                n_docs += 1
                max_id = max(max_id, int(ids.max()) if len(ids) else 0, tok.eot_id)
        if n_docs == 0:
            raise ValueError(f"no documents in {', '.join(map(str, inputs))}")
        meta = {
            "format": "axon-tokens-v1",
            "dtype": np.dtype(np_dtype).name,
            "vocab_size": tok.vocab_size,
            "n_tokens": n_tokens,
            "n_docs": n_docs,
            "max_token_id": max_id,
            "eot_id": tok.eot_id,
            "tokenizer": tok.name,
            "tokenizer_sha256": tok.sha256 if isinstance(tok, HFTokenizer) else None,
            "sources": [str(p) for p in inputs],
            "source_sha256": sha.hexdigest(),
        }
        f.commit()
    with _AtomicFile(json_path) as j:
        j.write((json.dumps(meta, indent=2) + "\n").encode())
        j.commit()
    return meta


def _bin_path(out: Path) -> Path:
    return out if out.suffix == ".bin" else out.with_name(out.name + ".bin")


def _pick_dtype(dtype: str, vocab_size: int) -> type:
    if dtype == "auto":
        return np.uint16 if vocab_size <= 2**16 else np.uint32
    if dtype == "uint16" and vocab_size > 2**16:
        raise ValueError(f"the tokenizer has {vocab_size} tokens, more than uint16 holds; use --dtype uint32")
    return {"uint16": np.uint16, "uint32": np.uint32}[dtype]


def _documents(inputs: list[Path], field: str, sha: "hashlib._Hash") -> Iterator[str]:
    """Each .txt file whole, or each line of a .jsonl file; every byte read goes into `sha`."""
    for path in inputs:
        with open(path, "rb") as f:
            if path.suffix == ".txt":
                raw = f.read()
                sha.update(raw)
                yield _utf8(raw, path)
            else:
                yield from _jsonl_documents(f, path, field, sha)


def _jsonl_documents(f: BinaryIO, path: Path, field: str, sha: "hashlib._Hash") -> Iterator[str]:
    for lineno, line in enumerate(f, 1):
        sha.update(line)
        if not line.strip():
            continue
        try:
            record = json.loads(_utf8(line, path))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({err})") from None
        if not isinstance(record, dict) or not isinstance(record.get(field), str):
            raise ValueError(f"{path}:{lineno}: no string field {field!r}; name the text field with --field")
        yield record[field]


def _utf8(raw: bytes, path: Path) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err})") from None


def _batches(items: Iterator[str], n: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


class _AtomicFile:
    """Writes to `<path>.tmp-<pid>`; `commit()` fsyncs and renames it onto `path`. Leaving the
    `with` block without commit (an error) deletes the temporary file."""

    def __init__(self, path: Path):
        self.path = path
        self.tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        self._f: Optional[BinaryIO] = None

    def __enter__(self) -> "_AtomicFile":
        self._f = open(self.tmp, "wb")
        return self

    def write(self, data: bytes) -> None:
        assert self._f is not None
        self._f.write(data)

    def commit(self) -> None:
        assert self._f is not None
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        self._f = None
        os.replace(self.tmp, self.path)
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def __exit__(self, *exc: object) -> None:
        if self._f is not None:
            self._f.close()
            self.tmp.unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
