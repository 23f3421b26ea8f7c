"""Instruction data (axon/sft_data.py, axon/chat_template.py) and packed attention (axon/model.py):
chat templates render as transformers does, only assistant tokens are trained, documents never
span rows nor see each other, masked targets change nothing, and unpacked batches keep the fused
causal path."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from axon import model as model_mod
from axon import sft_data
from axon.config import Data
from axon.tokenizer import ByteTokenizer, HFTokenizer
from parallel.loss_mask import IGNORE_INDEX
from perfmodel import rules
from perfmodel.specs import ModelSpec, Plan

TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}[SYS] {{ m['content'] }}\n"
            "{% elif m['role'] == 'user' %}[INST] {{ m['content'] | trim }} [/INST]"
            "{% else %} {{ m['content'] }}{{ eos_token }}\n{% endif %}{% endfor %}"
            "{% if add_generation_prompt %} {% endif %}")
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "  Who wrote Emma? "},
        {"role": "assistant", "content": "Jane Austen."}, {"role": "user", "content": "When?"},
        {"role": "assistant", "content": "In 1815, a truth universally acknowledged."}]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """A tiny BPE tokenizer saved by transformers (tokenizer.json + tokenizer_config.json) with TEMPLATE."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([m["content"] for m in CHAT] * 3, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = TEMPLATE
    path = tmp_path_factory.mktemp("hf_tok")
    fast.save_pretrained(path)
    return path


def tiny_spec(**kw) -> ModelSpec:
    base = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=64)
    base.update(kw)
    return ModelSpec(**base)


def tiny_model(spec: ModelSpec, seed: int = 0) -> model_mod.GPT:
    torch.manual_seed(seed)
    m = model_mod.GPT(spec).double()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.2)
    return m


# ---- chat templates ----

@pytest.mark.parametrize("gen", [False, True])
def test_chat_template_matches_transformers(hf_dir, gen):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(hf_dir)
    tok = HFTokenizer(hf_dir / "tokenizer.json")
    for msgs in (CHAT, CHAT[:2], CHAT[:4]):
        text = tok.chat.render(msgs, add_generation_prompt=gen)
        assert text == ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
        ids = ref.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        assert tok.encode(text).tolist() == list(ids)
    assert tok.special_tokens["bos_token"] == "<s>" and tok.bos_id == tok._tok.token_to_id("<s>")


def test_chat_template_is_sandboxed():
    from jinja2.exceptions import SecurityError
    from axon.chat_template import ChatTemplate

    evil = ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(SecurityError):
        evil.render([{"role": "user", "content": "x"}])
    with pytest.raises(Exception, match="no system"):
        ChatTemplate("{{ raise_exception('no system') }}").render([])


# ---- rendering and loss masks ----

def test_template_rendering_trains_only_assistant_turns(hf_dir):
    tok = HFTokenizer(hf_dir / "tokenizer.json")
    ids, keep = sft_data.render(tok, CHAT)
    segs = sft_data.segments(tok, CHAT)
    assert "".join(t for t, _ in segs) == tok.chat.render(CHAT)
    trained = "".join(t for t, tr in segs if tr)
    assert trained == "Jane Austen.</s>\nIn 1815, a truth universally acknowledged.</s>\n"  # the space: the prompt
    assert tok.decode(ids[keep]) == trained
    assert not keep[0] and len(ids) == len(keep)


def test_plain_rendering_for_the_byte_tokenizer():
    tok = ByteTokenizer()
    ids, keep = sft_data.render(tok, sft_data.conversation({"prompt": "Hi?", "response": "Yo"}, "x"))
    assert ids.tolist() == list(b"Hi?Yo") + [0]
    assert keep.tolist() == [False] * 3 + [True] * 3
    with pytest.raises(ValueError, match="prompt"):
        sft_data.conversation({"text": "no"}, "f:1")


# ---- packing ----

def _doc(n: int, first: int) -> tuple[np.ndarray, np.ndarray]:
    keep = np.ones(n, dtype=bool)
    keep[0] = False
    return np.arange(first, first + n, dtype=np.int64), keep


def test_pack_keeps_documents_whole_and_restarts_positions():
    docs = [_doc(5, 10), _doc(4, 20), _doc(9, 30), _doc(12, 40), _doc(3, 50)]
    p = sft_data.pack(docs, seq_len=8, pad_id=0, overlong="drop")  # rows of 9
    assert (p.documents, p.dropped, p.truncated) == (4, 1, 0)
    assert p.tokens.tolist() == [[10, 11, 12, 13, 14, 20, 21, 22, 23],
                                 [30, 31, 32, 33, 34, 35, 36, 37, 38],
                                 [50, 51, 52, 0, 0, 0, 0, 0, 0]]
    assert p.positions.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3], list(range(9)), [0, 1, 2, 0, 1, 2, 3, 4, 5]]
    assert not p.mask[:, 0].any() and not p.mask[2, 3:].any() and not p.mask[0, 5]
    t = sft_data.pack(docs, seq_len=8, pad_id=0, overlong="truncate")
    assert (t.documents, t.dropped, t.truncated) == (5, 0, 1)


def _write_jsonl(path: Path, n: int) -> Path:
    rng = np.random.default_rng(0)
    with open(path, "w") as f:
        for i in range(n):
            p = "q" * int(rng.integers(1, 8))
            r = "a" * int(rng.integers(1, 10))
            rec = {"prompt": p, "response": r} if i % 2 else {"messages": [
                {"role": "user", "content": p}, {"role": "assistant", "content": r}]}
            f.write(json.dumps(rec) + "\n")
        f.write(json.dumps({"prompt": "x" * 40, "response": "y"}) + "\n")  # longer than a row: dropped
    return path


def test_prepare_writes_the_format_and_the_sampler_reads_whole_rows(tmp_path):
    meta = sft_data.prepare([_write_jsonl(tmp_path / "chat.jsonl", 40)], tmp_path / "out" / "chat", "byte", 16)
    files = sft_data.paths(tmp_path / "out" / "chat")
    side = json.loads(files["sidecar"].read_text())
    assert side == meta and side["format"] == "packed-sft" and side["seq_len"] == 16 and side["dropped"] == 1
    assert side["documents"] == 40 and side["rendering"] == "plain" and side["dtype"] == "uint16"
    rows = side["rows"]
    assert files["tokens"].stat().st_size == rows * 17 * 2 and files["loss_mask"].stat().st_size == rows * 17
    assert not list(tmp_path.glob("out/*.tmp-*"))
    ds = sft_data.open_packed(Data(path=str(files["tokens"]), val_fraction=0.0), 16, 256)
    assert ds.rows == rows and sft_data.open_packed(Data(path=None), 16, 256) is None
    with pytest.raises(ValueError, match="train.seq_len=16"):
        sft_data.open_packed(Data(path=str(tmp_path / "out" / "chat")), 32, 256)
    sampler = sft_data.PackedSampler(len(ds), 16, 4, seed=3)
    full = sampler.local_batch(ds, 5, 0, 1)
    halves = [sampler.local_batch(ds, 5, i, 2) for i in range(2)]
    assert torch.equal(torch.cat([h.tokens for h in halves]), full.tokens)
    assert torch.equal(torch.cat([h.keep for h in halves]), full.keep)
    again = sft_data.PackedSampler(len(ds), 16, 4, seed=3).local_batch(ds, 5, 0, 1)
    assert torch.equal(again.positions, full.positions)
    rows_t = np.asarray(ds.tokens).reshape(rows, 17)
    for row in full.tokens:  # whole rows, as written
        assert any(np.array_equal(row.numpy(), r) for r in rows_t)
    # target j is kept only inside a document, on response bytes ('a' or the end byte 0)
    tgt = full.tokens[:, 1:][full.keep]
    assert set(tgt.tolist()) <= {ord("a"), 0}
    assert int(full.keep.sum()) > 0


def test_prepare_with_a_chat_template_and_the_command_line(hf_dir, tmp_path, capsys):
    src = tmp_path / "chat.jsonl"
    src.write_text(json.dumps({"messages": CHAT}) + "\n" + json.dumps({"prompt": "Who?", "response": "Jane."}) + "\n")
    out = tmp_path / "tpl"
    assert sft_data.main([str(src), "--tokenizer", str(hf_dir / "tokenizer.json"), "--seq-len", "127",
                          "--out", str(out)]) == 0
    meta = json.loads(sft_data.paths(out)["sidecar"].read_text())
    assert meta["rendering"] == "chat_template" and meta["documents"] == 2 and meta["rows"] == 1
    tok = HFTokenizer(hf_dir / "tokenizer.json")
    ds = sft_data.open_packed(Data(path=str(out), val_fraction=0.0), 127, tok.vocab_size)
    trained = tok.decode(np.asarray(ds.tokens)[np.asarray(ds.mask).astype(bool)])
    assert trained == "Jane Austen.</s>\nIn 1815, a truth universally acknowledged.</s>\nJane.</s>\n"
    plain = sft_data.prepare([src], tmp_path / "plain", str(hf_dir / "tokenizer.json"), 127, rendering="plain")
    assert plain["rendering"] == "plain" and plain["loss_tokens"] < meta["loss_tokens"]
    assert sft_data.main([str(src), "--out", str(out)]) == 2  # --seq-len missing: one line, exit code 2
    err = capsys.readouterr().err.strip()
    assert "--seq-len" in err and len(err.splitlines()) == 1


# ---- the model ----

def test_unpacked_path_keeps_is_causal(monkeypatch):
    calls = []
    real = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(model_mod.F, "scaled_dot_product_attention", spy)
    m = tiny_model(tiny_spec())
    m(torch.randint(0, 64, (2, 16)))
    assert calls and all(c.get("is_causal") is True and c.get("attn_mask") is None for c in calls)


@pytest.mark.parametrize("pos", ["rope", "learned"])
def test_packed_documents_do_not_see_each_other(pos):
    m = tiny_model(tiny_spec(pos=pos))
    g = torch.Generator().manual_seed(1)
    d1, d2 = torch.randint(0, 64, (7,), generator=g), torch.randint(0, 64, (6,), generator=g)
    pad = torch.zeros(3, dtype=torch.int64)
    positions = torch.cat([torch.arange(7), torch.arange(6), torch.arange(3)])[None]  # [1, 16]
    with torch.no_grad():
        row = m(torch.cat([d1, d2, pad])[None], positions)  # [1, 16, V]
        other = m(torch.cat([(d1 + 5) % 64, d2, pad])[None], positions)
        alone = m(d2[None])  # document 2 at positions 0..5, unpacked
    assert torch.equal(row[0, 7:13], other[0, 7:13])  # bit-identical whatever document 1 holds
    assert not torch.equal(row[0, :7], other[0, :7])
    torch.testing.assert_close(row[0, 7:13], alone[0], rtol=1e-12, atol=1e-12)


def test_per_sample_positions_equal_shared_ones_for_one_document():
    m = tiny_model(tiny_spec())
    tokens = torch.randint(0, 64, (3, 16))
    with torch.no_grad():
        shared = m(tokens)
        per_sample = m(tokens, torch.arange(16).expand(3, 16))
    torch.testing.assert_close(per_sample, shared, rtol=1e-12, atol=1e-12)


def test_masked_targets_change_neither_loss_nor_gradients():
    from parallel.head_loss import cross_entropy_sum

    m = tiny_model(tiny_spec())
    tokens = torch.randint(0, 64, (2, 17))
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5, 6, 7, 8, 0, 1]] * 2)
    keep = torch.zeros(2, 16, dtype=torch.bool)
    keep[:, 3:5] = keep[:, 9:14] = True  # responses; prompts, boundaries and padding ignored
    targets = tokens[:, 1:].masked_fill(~keep, IGNORE_INDEX)

    def loss_and_grads(tok: torch.Tensor, tgt: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        m.zero_grad()
        loss = cross_entropy_sum(m(tok[:, :-1], positions[:, :-1]), tgt) / keep.sum()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in m.parameters()]

    loss, grads = loss_and_grads(tokens, targets)
    changed = tokens.clone()
    changed[:, 16] = (changed[:, 16] + 1) % 64  # the last target (padding: ignored) and an input nobody reads
    loss2, grads2 = loss_and_grads(changed, changed[:, 1:].masked_fill(~keep, IGNORE_INDEX))
    assert torch.equal(loss, loss2) and all(torch.equal(a, b) for a, b in zip(grads, grads2))
    t3 = targets.clone()
    t3[:, 0] = 7  # unmasking a prompt target changes the loss: the mask is what held it out
    assert not torch.equal(loss_and_grads(tokens, t3)[0], loss)


def test_packed_rules_reject_what_cannot_pass_positions():
    spec = tiny_spec()
    assert rules.packed_rules(spec, Plan(dp=2, cp=2)) == rules.packed_rules(spec, Plan(recompute="selective")) == []
    (v,) = rules.packed_rules(tiny_spec(pos="learned"), Plan(tp_col=2, sequence_parallel=True))
    assert v.knob == "parallel.sequence_parallel" and "packed" in v.message


def test_microbatches_mask_targets_and_count_the_kept_ones():
    from types import SimpleNamespace

    from axon.config import Goldfish
    from parallel.context import ContextParallel

    tokens = torch.arange(2 * 9).view(2, 9)
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1], [0, 1, 2, 3, 4, 5, 6, 0, 1]])
    keep = torch.tensor([[0, 1, 1, 0, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    batch = sft_data.PackedBatch(tokens, keep, positions)
    one = SimpleNamespace(size=1)
    out, count = sft_data.microbatches(batch, ContextParallel(1, 0, "ring"), 1, torch.device("cpu"), Goldfish(k=0), one)
    assert count == int(keep.sum()) and len(out) == 2
    for (inputs, targets, pos), t, k, p in zip(out, tokens, keep, positions):
        assert torch.equal(inputs[0], t[:-1]) and torch.equal(pos[0], p[:-1])
        assert torch.equal(targets[0], t[1:].masked_fill(~k, IGNORE_INDEX))
    _, fewer = sft_data.microbatches(batch, ContextParallel(1, 0, "ring"), 2, torch.device("cpu"),
                                     Goldfish(k=2, mode="static"), one)
    assert fewer < count  # the Goldfish mask on top of the prompt mask
    inputs, targets, pos = ContextParallel(2, 1, "ring").shard_packed(tokens, keep, positions)
    idx = [2, 3, 4, 5]  # cp rank 1 of 2 holds zig-zag chunks 1 and 2
    assert torch.equal(inputs, tokens[:, idx]) and torch.equal(pos, positions[:, idx])
    assert torch.equal(targets, tokens[:, 1:][:, idx].masked_fill(~keep[:, idx], IGNORE_INDEX))
