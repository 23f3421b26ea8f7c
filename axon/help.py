"""`axon train --help`, generated from the config schema (axon/config.py) so it never drifts: the
config groups with their presets (configs/<group>/*.yaml) and every key with its type, default and
one-line doc. The doc of a key is the comment on its field in the frozen dataclass that declares it
(docs/architecture.md, "Where each fact lives"), read with `tokenize`; also "did you mean".
"""
from __future__ import annotations

import inspect
import textwrap
import io
import tokenize
from dataclasses import MISSING, fields, is_dataclass
from difflib import get_close_matches
from functools import lru_cache
from typing import Any, Optional, get_type_hints

from axon import config

# the two settings declared only in the schema (`extra` of config.schema_of), with no field to comment
_SCHEMA_ONLY_DOCS = {"model.name": "the preset's name, for logs", "parallel.auto": "let the performance "
                     "model pick the layout (parallel=auto)", "model.init": "random | hf:<dir> (weights, and the "
                     "model's shape from its config.json)"}


def presets(group: str) -> list[str]:
    """The preset names of a config group: configs/<group>/*.yaml (never the internal `*_schema`)."""
    return sorted(p.stem for p in (config.CONFIG_DIR / group).glob("*.yaml"))


def suggest(word: str, choices: list[str]) -> Optional[str]:
    """The closest of `choices` to `word` (`llama3-70b` -> `llama3.1-70b`), or None."""
    close = get_close_matches(word, choices, n=1, cutoff=0.6)
    return close[0] if close else None


@lru_cache(maxsize=None)
def field_comments(cls: type) -> dict[str, str]:
    """Field name -> its doc: the comment at the end of its line, else the comment lines just above."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    lines = source.splitlines()
    out: dict[str, str] = {}
    for i, line in enumerate(lines, 1):
        name = line.strip().split(":", 1)[0]
        if not name.isidentifier() or line.strip().startswith(("def ", "class ", "@", "#")) or ":" not in line:
            continue
        if i in comments and not lines[i - 1].strip().startswith("#"):
            out[name] = comments[i]
            continue
        above, j = [], i - 1
        while j in comments and lines[j - 1].strip().startswith("#"):
            above.insert(0, comments[j])
            j -= 1
        if above:
            out[name] = " ".join(above)
    return out


def _type_name(typ: Any) -> str:
    text = getattr(typ, "__name__", None) if not getattr(typ, "__args__", None) else None
    if text:
        return text
    text = str(typ).replace("typing.", "")
    return text.replace("Optional[", "").rstrip("]") + "|null" if text.startswith("Optional[") else text


def _default(f: Any) -> Any:
    if f.default_factory is not MISSING:
        value = f.default_factory()
        return [] if isinstance(value, list) and not value else value
    return "???" if f.default is MISSING else f.default


def schema_keys(node: type = config.Config, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """Every schema key as (dotted key, type, default, doc), in declaration order."""
    frozen = config.FROZEN.get(prefix.rstrip("."), node)
    docs = field_comments(frozen)
    hints = get_type_hints(node)
    out = []
    for f in fields(node):
        typ, key = hints[f.name], f"{prefix}{f.name}"
        if is_dataclass(typ):
            out += schema_keys(typ, f"{key}.")
            continue
        doc = docs.get(f.name)
        if doc is None:  # a stripped name (schema_of's `strip`: logger.wandb.mode is Logging.wandb_mode)
            doc = next((d for n, d in docs.items() if n.endswith(f"_{f.name}")), "")
        out.append((key, _type_name(typ), _default(f), doc or _SCHEMA_ONLY_DOCS.get(key, "")))
    return out


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    return "null" if v is None else f"{v:g}" if isinstance(v, float) else str(v)


def train_help() -> str:
    lines = ["usage: axon train [--help] [--cfg] [--debug] [key=value ...] [group=preset ...]", "",
             "Train a model. Settings are Hydra overrides: `group=preset` picks a preset file, `key=value`",
             "sets one setting (after the presets). Unknown keys are an error, `+key=...` included.", "",
             "options:", "  --help, -h   this text", "  --cfg        print the resolved config and exit",
             "  --debug      print the full traceback of an error", "", "config groups (configs/<group>/):"]
    for group in config.GROUPS:
        lines.append(f"  {group:<10} {', '.join(presets(group))}")
    lines += ["", "settings (key  type  default  doc):"]
    rows = schema_keys()
    kw, tw = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    dw = max(len(_value(r[2])) for r in rows)
    for key, typ, default, doc in rows:
        lines.append(f"  {key:<{kw}}  {typ:<{tw}}  {_value(default):<{dw}}  {doc}".rstrip())
    return "\n".join(lines + ["", *exit_codes()])


def exit_codes() -> list[str]:
    """The "Exit codes:" paragraph of axon/train.py's docstring (their one home), as help lines."""
    from axon import train

    text = (train.__doc__ or "").split("Exit codes:", 1)[-1].split("\n\n", 1)[0]
    return ["exit codes:", *textwrap.wrap(" ".join(text.split()), width=96, initial_indent="  ",
                                          subsequent_indent="  ")]
