"""Tokenizers: the byte-level one (vocabulary 256, used by the embedded corpus) and a Hugging Face
`tokenizer.json` read from a local file with the `tokenizers` package.

    tok = load_tokenizer("byte")                     # or load_tokenizer("path/to/tokenizer.json")
    ids = tok.encode("Hello")                        # np.ndarray [n] uint32
    text = tok.decode(ids)

Both expose `name`, `vocab_size`, `eot_id` (the end-of-document token appended after each
document by `axon prepare-data`; None when a tokenizer.json names none we recognise),
`encode`, `encode_batch` and `decode`; and for instruction data (axon/sft_data.py) `chat`
(the model's chat template, axon/chat_template.py, or None), `bos_id` and `add_bos`.

A tokenizer.json's settings come from the `tokenizer_config.json` next to it, when there is one
(as transformers reads a model directory): `chat_template` (a string, or a list of named
templates of which `default` is used; a `chat_template.jinja` file next to it wins, as in
transformers >= 4.43), `bos_token`, `eos_token`, `pad_token`, `unk_token` (strings or
{"content": ...} objects) and `add_bos_token`. The byte tokenizer has no chat template.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

import numpy as np

TokenIds = Union[np.ndarray, Sequence[int]]

# Special tokens that end a document in common tokenizer.json files (GPT-2, Llama 3, Llama 2, ...).
EOT_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[EOS]")


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255. Byte 0 (NUL, which never occurs in text) ends a document,
    so the vocabulary stays 256 and matches `model.vocab_size=256`."""

    name = "byte"
    vocab_size = 256
    eot_id: Optional[int] = 0
    chat = None  # no chat template: instruction data uses the plain rendering (axon/sft_data.py)
    bos_id: Optional[int] = None
    add_bos = False

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint32)  # [n_bytes]

    def encode_batch(self, texts: Iterable[str]) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: TokenIds) -> str:
        arr = np.asarray(ids)
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise ValueError(f"byte tokenizer: token ids must be in 0..255, got {arr.min()}..{arr.max()}")
        return arr.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face `tokenizer.json` (BPE, WordPiece, Unigram, ...) loaded from a local file.
    `eot_token` names the end-of-document token; by default the first of EOT_CANDIDATES that the
    vocabulary holds."""

    def __init__(self, path: Union[str, Path], eot_token: Optional[str] = None):
        from tokenizers import Tokenizer  # imported here: the byte tokenizer needs no extra package

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(
                f"tokenizer {str(path)!r}: no such file (give 'byte' or the path of a Hugging Face tokenizer.json)")
        raw = self.path.read_bytes()
        self.sha256 = hashlib.sha256(raw).hexdigest()
        self._tok = Tokenizer.from_str(raw.decode("utf-8"))
        self.name = str(self.path)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        if eot_token is not None:
            self.eot_id = self._tok.token_to_id(eot_token)
            if self.eot_id is None:
                raise ValueError(f"end-of-document token {eot_token!r} is not in the vocabulary of {self.path}")
        else:
            found = [self._tok.token_to_id(t) for t in EOT_CANDIDATES]
            self.eot_id = next((i for i in found if i is not None), None)
        self._read_config(self.path.parent)

    def _read_config(self, folder: Path) -> None:
        """chat template, special tokens and add_bos from tokenizer_config.json (see the module doc)."""
        cfg_path = folder / "tokenizer_config.json"
        cfg: dict[str, Any] = {}
        if cfg_path.is_file():
            try:
                cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ValueError(f"{cfg_path} is not valid JSON ({e}); fix or remove it") from None
        special = {k: _token_text(cfg.get(k)) for k in SPECIAL_TOKENS}
        self.special_tokens = {k: v for k, v in special.items() if v is not None}
        bos = self.special_tokens.get("bos_token")
        self.bos_id = self._tok.token_to_id(bos) if bos is not None else None
        self.add_bos = bool(cfg.get("add_bos_token", False)) and self.bos_id is not None
        source = _template_source(cfg.get("chat_template"), cfg_path)
        jinja_file = folder / "chat_template.jinja"
        if jinja_file.is_file():
            source = jinja_file.read_text(encoding="utf-8")
        self.chat_source: Optional[str] = source or None
        self._chat: Any = None

    @property
    def chat(self) -> Any:
        """The chat template (axon/chat_template.py), compiled on first use; None when there is none."""
        if self._chat is None and self.chat_source is not None:
            from jinja2.exceptions import TemplateSyntaxError
            from axon.chat_template import ChatTemplate
            try:
                self._chat = ChatTemplate(self.chat_source, self.special_tokens)
            except TemplateSyntaxError as e:
                raise ValueError(f"the chat_template next to {self.path} does not compile ({e}); fix it in "
                                 f"tokenizer_config.json") from None
        return self._chat

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.uint32)  # [n]

    def encode_batch(self, texts: Iterable[str]) -> list[np.ndarray]:
        encs = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.uint32) for e in encs]

    def decode(self, ids: TokenIds) -> str:
        return self._tok.decode([int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens=False)


Tokenizer = Union[ByteTokenizer, HFTokenizer]

SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")  # passed to chat templates


def _token_text(value: Any) -> Optional[str]:
    """A tokenizer_config.json special token: a string or an AddedToken object {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _template_source(value: Any, cfg_path: Path) -> Optional[str]:
    """tokenizer_config.json's chat_template: a string, or [{"name", "template"}] (the `default` one)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
    raise ValueError(f"{cfg_path}: chat_template must be a string or a list holding a 'default' template")


def load_tokenizer(spec: str, eot_token: Optional[str] = None) -> Tokenizer:
    """`spec` is `byte` or the path of a Hugging Face tokenizer.json (`data.tokenizer`)."""
    if spec == "byte":
        if eot_token is not None:
            raise ValueError("the byte tokenizer's end-of-document token is fixed (byte 0); drop the eot token option")
        return ByteTokenizer()
    return HFTokenizer(spec, eot_token=eot_token)
