"""Byte and Hugging Face tokenizers: round trips, end-of-document token, errors."""
import numpy as np
import pytest

from axon.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer
from tests.unit.tokenizer_fixture import make_tokenizer_json


@pytest.mark.parametrize("text", ["", "hello world", "naïve café — 日本語 🙂\n\ttabs", "\x01\x7f"])
def test_byte_round_trip(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids.dtype == np.uint32
    assert ids.tolist() == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.decode(ids.tolist()) == text


def test_byte_tokenizer_vocab_and_eot():
    tok = load_tokenizer("byte")
    assert tok.vocab_size == 256 and tok.eot_id == 0
    assert [t.tolist() for t in tok.encode_batch(["a", "bc"])] == [[97], [98, 99]]
    with pytest.raises(ValueError, match="0..255"):
        tok.decode([256])
    with pytest.raises(ValueError, match="eot token"):
        load_tokenizer("byte", eot_token="</s>")


def test_hf_tokenizer_round_trip(tmp_path):
    path = make_tokenizer_json(tmp_path / "tokenizer.json")
    tok = load_tokenizer(str(path))
    assert isinstance(tok, HFTokenizer)
    text = "a single man in want of a wife, ünïcode"
    ids = tok.encode(text)
    assert ids.dtype == np.uint32 and len(ids) < len(text.encode())  # merges happened
    assert tok.decode(ids) == text
    assert [t.tolist() for t in tok.encode_batch([text, "Emma"])] == [ids.tolist(), tok.encode("Emma").tolist()]
    assert tok.eot_id == tok._tok.token_to_id("<|endoftext|>")
    assert tok.vocab_size > 256 and len(tok.sha256) == 64


def test_hf_tokenizer_eot_choice(tmp_path):
    path = make_tokenizer_json(tmp_path / "tokenizer.json", eot="<sep>")
    assert load_tokenizer(str(path)).eot_id is None  # none of the usual names
    assert load_tokenizer(str(path), eot_token="<sep>").eot_id == 1
    with pytest.raises(ValueError, match="not in the vocabulary"):
        load_tokenizer(str(path), eot_token="</s>")


def test_missing_tokenizer_file_names_the_choices(tmp_path):
    with pytest.raises(FileNotFoundError, match="'byte' or the path"):
        load_tokenizer(str(tmp_path / "nope.json"))
