"""Generation and model loading for a single process (no parallelism).

    model = load_model(checkpoint_dir)                       # the plain GPT, weights from a run
    model = load_hf_model(hf_dir)                            # or from a Hugging Face Llama directory
    out = greedy(model, prompts, n_new)                      # prompts [N, P] -> [N, n_new]
    out = sample(model, prompts, n_new, Sampling(temperature=0.8, top_p=0.95), generator)

`load_model` reads the model shape from the checkpoint's axon.json and the weights from its DCP
shards by parameter name, so a checkpoint written under any layout loads here. Each new token
re-runs the forward over the whole (cropped) sequence: exactly the training forward; a KV cache
can replace the loop body later without changing the interface. `sample` draws from the softmax
at `temperature`, restricted to the `top_k` most likely tokens and to the smallest set whose
probability reaches `top_p`; temperature 0 is greedy. `axon generate` (axon/generate_cmd.py)
is the command.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from axon import checkpoint as ckpt
from axon import hf_config, hf_load
from axon.init import materialize
from axon.model import GPT, build
from perfmodel.specs import ModelSpec


def load_model(path: Path, device: torch.device = torch.device("cpu")) -> GPT:
    """The whole model of the checkpoint `path` (a step_* directory, or a checkpoints/ or run
    directory: its newest checkpoint), in eval mode on `device`."""
    found = ckpt.resolve(str(path), Path(path))
    if found is None and (Path(path) / "checkpoints").is_dir():
        found = ckpt.resolve(str(Path(path) / "checkpoints"), Path(path) / "checkpoints")
    meta = ckpt.read_meta(found)
    spec = ModelSpec(**meta["model"])
    model = build(spec)
    materialize(model, spec, 0, device)
    state = dict(model.named_parameters())
    with warnings.catch_warnings():  # "no process group: loading in a single process" is the intent
        warnings.simplefilter("ignore", UserWarning)
        ckpt.read(found, {"model": state})  # manifest checked first; never runs code from the files
    return model.eval()


def load_hf_model(directory: Path, device: torch.device = torch.device("cpu")) -> GPT:
    """The whole model of a Hugging Face Llama directory (config.json + safetensors), in eval mode."""
    spec = hf_config.spec_from_dir(Path(directory))
    model = build(spec)
    materialize(model, spec, 0, device)
    hf_load.init_from(f"{hf_load.PREFIX}{directory}", dict(model.named_parameters()), {}, spec)
    return model.eval()


@dataclass(frozen=True)
class Sampling:
    """How `sample` picks each token; temperature 0 is greedy (the other settings are then moot)."""

    temperature: float = 1.0  # >= 0; divides the logits
    top_k: int = 0  # keep the k most likely tokens; 0 = all
    top_p: float = 1.0  # keep the smallest set of most likely tokens whose probability reaches p; in (0, 1]

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"--temperature {self.temperature} must be >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise ValueError(f"--top-k {self.top_k} must be >= 0 (0 = no limit)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p {self.top_p} must be in (0, 1] (1 = no limit)")


GREEDY = Sampling(temperature=0.0)


def filtered_logits(logits: torch.Tensor, how: Sampling) -> torch.Tensor:
    """logits [N, V] / temperature with the tokens outside top-k and top-p set to -inf (the most
    likely token always stays)."""
    x = logits.float() / how.temperature  # [N, V]
    if 0 < how.top_k < x.shape[-1]:
        kth = x.topk(how.top_k, dim=-1).values[:, -1:]  # [N, 1]
        x = x.masked_fill(x < kth, float("-inf"))
    if how.top_p < 1:
        sorted_x, order = x.sort(dim=-1, descending=True)  # [N, V]
        before = sorted_x.softmax(-1).cumsum(-1) - sorted_x.softmax(-1)  # probability of the tokens ahead
        drop = before >= how.top_p  # [N, V]: the set already reached p without this token
        x = x.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    return x


@torch.no_grad()
def sample(model: GPT, prompts: torch.Tensor, n_new: int, how: Sampling = GREEDY,
           generator: Optional[torch.Generator] = None, stop_id: Optional[int] = None) -> torch.Tensor:
    """`n_new` tokens after each prompt: prompts [N, P] -> [N, n_new]. The context is cropped to
    the model's last max_seq_len tokens; after `stop_id` a row repeats it (the caller cuts there)."""
    window = model.spec.max_seq_len
    seq = prompts  # [N, P + t]
    done = torch.zeros(prompts.shape[0], dtype=torch.bool, device=prompts.device)  # [N]
    for _ in range(n_new):
        logits = model(seq[:, -window:])[:, -1]  # [N, V]
        if how.temperature == 0:
            nxt = logits.argmax(-1)  # [N]
        else:
            probs = filtered_logits(logits, how).softmax(-1)  # [N, V]
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1)  # [N]
        if stop_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, stop_id), nxt)
            done |= nxt == stop_id
        seq = torch.cat((seq, nxt[:, None]), dim=1)
        if stop_id is not None and bool(done.all()):
            break
    out = seq[:, prompts.shape[1]:]  # [N, <= n_new]
    if out.shape[1] < n_new:  # every row stopped early: pad with the stop token
        out = torch.cat((out, out.new_full((out.shape[0], n_new - out.shape[1]), stop_id)), dim=1)
    return out


def greedy(model: GPT, prompts: torch.Tensor, n_new: int) -> torch.Tensor:
    """The `n_new` most likely next tokens, one at a time: prompts [N, P] -> [N, n_new]."""
    return sample(model, prompts, n_new, GREEDY)
