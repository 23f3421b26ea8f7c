"""Sampling (axon/generate.py) and `axon generate`: top-k / top-p keep exactly the right tokens,
temperature 0 and top-k 1 are greedy, a seed repeats a draw, draws follow the softmax, a stop
token ends a row; greedy tokens from a Hugging Face Llama equal transformers' own generate()."""
from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch

from axon import cli
from axon.generate import GREEDY, Sampling, filtered_logits, load_hf_model, sample
from tests.hf_fixture import make_llama


@dataclass(frozen=True)
class _Spec:
    max_seq_len: int = 16


class FixedLogits(torch.nn.Module):
    """A 'model' whose next-token logits are always `logits` [V] (fake GPT: .spec and forward)."""

    def __init__(self, logits: list[float]):
        super().__init__()
        self.spec = _Spec()
        self.logits = torch.tensor(logits)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(tokens.shape[0], tokens.shape[1], -1)  # [N, T, V]


def kept(logits: list[float], how: Sampling) -> list[int]:
    out = filtered_logits(torch.tensor([logits]), how)[0]
    return torch.isfinite(out).nonzero().flatten().tolist()


def test_top_k_and_top_p_keep_the_right_tokens():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().tolist()
    assert kept(logits, Sampling(top_k=2)) == [0, 1]
    assert kept(logits, Sampling(top_p=0.5)) == [0]  # 0.5 reached by the first token
    assert kept(logits, Sampling(top_p=0.51)) == [0, 1]
    assert kept(logits, Sampling(top_p=0.95)) == [0, 1, 2]
    assert kept(logits, Sampling(top_p=1.0)) == [0, 1, 2, 3]
    assert kept(logits, Sampling(top_k=3, top_p=0.6)) == [0, 1]
    assert kept(logits, Sampling(top_p=1e-9)) == [0]  # the most likely token always stays


def test_greedy_seeds_and_frequencies():
    model = FixedLogits(torch.tensor([0.1, 0.6, 0.3]).log().tolist())
    prompt = torch.zeros(1, 2, dtype=torch.long)
    assert sample(model, prompt, 4, GREEDY).tolist() == [[1, 1, 1, 1]]
    assert sample(model, prompt, 4, Sampling(top_k=1)).tolist() == [[1, 1, 1, 1]]
    a = sample(model, prompt, 32, Sampling(), torch.Generator().manual_seed(3))
    b = sample(model, prompt, 32, Sampling(), torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    draws = sample(model, torch.zeros(4000, 1, dtype=torch.long), 1, Sampling(), torch.Generator().manual_seed(0))
    freq = torch.bincount(draws.flatten(), minlength=3).float() / draws.numel()
    assert freq.tolist() == pytest.approx([0.1, 0.6, 0.3], abs=0.03)
    low = sample(model, torch.zeros(4000, 1, dtype=torch.long), 1, Sampling(temperature=0.25),
                 torch.Generator().manual_seed(0))
    assert (low == 1).float().mean() > 0.9  # a low temperature sharpens towards the mode


def test_stop_token_ends_a_row():
    model = FixedLogits([0.0, 5.0, 0.0])  # greedy: always token 1
    out = sample(model, torch.zeros(2, 1, dtype=torch.long), 5, GREEDY, stop_id=1)
    assert out.tolist() == [[1] * 5, [1] * 5]  # stopped at once, padded with the stop token


def test_bad_sampling_settings_are_rejected():
    for kwargs, name in (({"temperature": -1.0}, "--temperature"), ({"top_k": -2}, "--top-k"),
                         ({"top_p": 0.0}, "--top-p"), ({"top_p": 1.5}, "--top-p")):
        with pytest.raises(ValueError, match=name):
            Sampling(**kwargs)


def test_greedy_matches_transformers_generate_and_the_command(tmp_path, capsys):
    from transformers import LlamaForCausalLM

    path = make_llama(tmp_path / "hf", n_layers=2, vocab=256)
    prompt = torch.tensor([[72, 105, 32, 116, 104]])  # "Hi th"
    ours = sample(load_hf_model(path), prompt, 6, GREEDY)  # [1, 6]
    hf = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    theirs = hf.generate(prompt, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)[:, 5:]
    assert ours.tolist() == theirs.tolist()
    code = cli.main(["generate", f"hf:{path}", "--prompt", "Hi th", "--max-new-tokens", "6", "--tokenizer", "byte",
                     "--json"])
    out = json.loads(capsys.readouterr().out)
    tokens = ours[0].tolist()
    tokens = tokens[:tokens.index(0)] if 0 in tokens else tokens  # byte 0 ends a document
    assert code == 0 and out == [{"prompt": "Hi th", "completion": bytes(tokens).decode("utf-8", errors="replace")}]
    assert cli.main(["generate", f"hf:{path}", "--prompt", "x", "--top-p", "2"]) == 2
    assert "--top-p 2.0 must be in (0, 1]" in capsys.readouterr().err
