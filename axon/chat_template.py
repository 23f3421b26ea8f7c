"""Chat templates: render a conversation (a list of {role, content}) to text with the Jinja2
template a model directory ships in tokenizer_config.json, as transformers' apply_chat_template does.

    tpl = ChatTemplate(source, special_tokens={"bos_token": "<s>", "eos_token": "</s>"})
    text = tpl.render(messages, add_generation_prompt=True)

Templates are untrusted code: they are compiled in jinja2's ImmutableSandboxedEnvironment (no
attribute access to Python internals, no mutation of the values passed in), with the same
environment transformers builds (trim_blocks, lstrip_blocks, loop controls; `raise_exception`,
`strftime_now`, a `tojson` that does not HTML-escape), so a template renders the same text here
as in transformers. Nothing is ever evaluated outside the sandbox.
"""
from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Mapping, Sequence

Message = Mapping[str, Any]  # {"role": "user" | "assistant" | "system" | ..., "content": str}


def _raise_exception(message: str) -> None:
    from jinja2.exceptions import TemplateError
    raise TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class ChatTemplate:
    """One compiled chat template and the special-token strings it may read (bos_token, ...)."""

    def __init__(self, source: str, special_tokens: Mapping[str, str] | None = None):
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        self.source = source
        self.special_tokens = dict(special_tokens or {})
        self._template = env.from_string(source)

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
        """The conversation as text (special tokens as text; encode it without adding any)."""
        chat = [dict(m) for m in messages]  # fresh copies: the template never sees the caller's dicts
        for i, m in enumerate(chat):
            if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ValueError(f"message {i} needs string 'role' and 'content' fields, got {sorted(m)}")
        return self._template.render(messages=chat, add_generation_prompt=add_generation_prompt,
                                     **self.special_tokens)
