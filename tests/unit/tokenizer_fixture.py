"""A tiny BPE tokenizer.json for the tokenizer and prepare-data tests (built on the fly: no download)."""
from __future__ import annotations

from pathlib import Path

SENTENCES = [
    "It is a truth universally acknowledged, that a single man in possession of a good fortune",
    "must be in want of a wife.",
    "Emma Woodhouse, handsome, clever, and rich, with a comfortable home and happy disposition",
]


def make_tokenizer_json(path: Path, eot: str = "<|endoftext|>") -> Path:
    """A tiny BPE tokenizer.json trained on SENTENCES, with `eot` as its special token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", eot],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SENTENCES, trainer=trainer)
    tok.save(str(path))
    return path
