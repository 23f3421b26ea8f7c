"""Hugging Face Llama `config.json` <-> `ModelSpec`, and the safe reading of a Hugging Face
directory's json files (no code is ever executed: no trust_remote_code, no pickle).

    spec = spec_from_dir(Path("Llama-3.1-8B"))         # layers, widths, GQA, RoPE (+ llama3 scaling)
    (out / "config.json").write_text(json.dumps(hf_config(spec)))

Llama 3.1 `rope_scaling` (transformers >= 5 writes it as `rope_parameters`, holding `rope_theta`
too) maps to `ModelSpec.rope_scaling="llama3"` and its four factors.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from perfmodel.specs import ModelSpec, PlanError

ARCH = "LlamaForCausalLM"


class HFError(ValueError):
    """A Hugging Face directory Axon cannot read; the message names the file or field and the fix."""


def read_json(directory: Path, name: str) -> dict[str, Any]:
    """`directory / name` parsed as json; `name` must be a plain file name inside `directory`."""
    path = safe_child(directory, name)
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise HFError(f"cannot read {path} ({e}); point model.init / the convert source at a Hugging Face "
                      f"model directory holding config.json and *.safetensors") from e


def safe_child(directory: Path, name: str) -> Path:
    """`directory / name`, refusing names that leave `directory` (`..`, absolute paths, sub-folders)."""
    if not name or Path(name).name != name or name in (".", ".."):
        raise HFError(f"file name {name!r} in {directory} is not a plain file name; the index or config "
                      f"is malformed (refusing to read outside {directory})")
    return Path(directory) / name


def _rope(cfg: dict[str, Any]) -> dict[str, Any]:
    params = dict(cfg.get("rope_parameters") or {})
    params.update(cfg.get("rope_scaling") or {})
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return {"rope_theta": float(theta), "rope_scaling": "none"}
    if kind != "llama3":
        raise HFError(f"config.json rope type {kind!r} is not supported (only default and llama3); "
                      f"convert a Llama / Llama 3.1 checkpoint")
    return {"rope_theta": float(theta), "rope_scaling": "llama3", "rope_factor": float(params["factor"]),
            "rope_low_freq_factor": float(params["low_freq_factor"]),
            "rope_high_freq_factor": float(params["high_freq_factor"]),
            "rope_original_max_len": int(params["original_max_position_embeddings"])}


def spec_from_config(cfg: dict[str, Any]) -> ModelSpec:
    """The ModelSpec of a Llama config.json (as a dict)."""
    if cfg.get("model_type") != "llama" and ARCH not in (cfg.get("architectures") or []):
        raise HFError(f"config.json model_type={cfg.get('model_type')!r} is not a Llama model; only "
                      f"{ARCH} checkpoints can be converted")
    for key, want in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if cfg.get(key, want) != want:
            raise HFError(f"config.json {key}={cfg[key]!r} is not supported (Axon's Llama needs {want!r})")
    heads, hidden = int(cfg["num_attention_heads"]), int(cfg["hidden_size"])
    if cfg.get("head_dim") not in (None, hidden // heads):
        raise HFError(f"config.json head_dim={cfg['head_dim']} differs from hidden_size / num_attention_heads "
                      f"= {hidden // heads}; Axon needs head_dim = hidden_size / num_attention_heads")
    spec = ModelSpec(n_layers=int(cfg["num_hidden_layers"]), d_model=hidden, n_heads=heads,
                     n_kv_heads=int(cfg.get("num_key_value_heads") or heads), d_ff=int(cfg["intermediate_size"]),
                     vocab_size=int(cfg["vocab_size"]), max_seq_len=int(cfg.get("max_position_embeddings", 2048)),
                     norm="rmsnorm", pos="rope", mlp="swiglu", tied_embeddings=bool(cfg.get("tie_word_embeddings")),
                     bias=False, norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), **_rope(cfg))
    try:
        spec.check()
    except PlanError as e:
        raise HFError(f"config.json describes a model Axon cannot build: {e}") from e
    return spec


def spec_from_dir(directory: Path) -> ModelSpec:
    return spec_from_config(read_json(Path(directory), "config.json"))


def hf_config(spec: ModelSpec, dtype: str = "float32") -> dict[str, Any]:
    """A Llama config.json (as a dict) that `transformers` loads as `spec`."""
    if (spec.norm, spec.pos, spec.mlp, spec.bias) != ("rmsnorm", "rope", "swiglu", False):
        raise HFError(f"only Llama-shaped models export to Hugging Face (model.norm=rmsnorm, model.pos=rope, "
                      f"model.mlp=swiglu, model.bias=false); this one has {spec.norm}, {spec.pos}, {spec.mlp}, "
                      f"bias={spec.bias}")
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": spec.rope_theta}
    if spec.rope_scaling == "llama3":
        rope.update(rope_type="llama3", factor=spec.rope_factor, low_freq_factor=spec.rope_low_freq_factor,
                    high_freq_factor=spec.rope_high_freq_factor,
                    original_max_position_embeddings=spec.rope_original_max_len)
    return {"architectures": [ARCH], "model_type": "llama", "hidden_act": "silu", "attention_bias": False,
            "mlp_bias": False, "hidden_size": spec.d_model, "intermediate_size": spec.d_ff,
            "num_hidden_layers": spec.n_layers, "num_attention_heads": spec.n_heads,
            "num_key_value_heads": spec.n_kv_heads, "head_dim": spec.head_dim, "vocab_size": spec.vocab_size,
            "max_position_embeddings": spec.max_seq_len, "rms_norm_eps": spec.norm_eps,
            "rope_theta": spec.rope_theta, "rope_scaling": rope if spec.rope_scaling == "llama3" else None,
            "tie_word_embeddings": spec.tied_embeddings, "torch_dtype": dtype}
