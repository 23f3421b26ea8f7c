"""`axon prepare-data`: .txt and .jsonl inputs, byte and tokenizer.json tokenizers, uint16/uint32
outputs read back through open_dataset, and atomic writes."""
import hashlib
import json

import numpy as np
import pytest

from axon.config import Data
from axon.data import open_dataset
from axon.prepare_data import main
from axon.tokenizer import load_tokenizer
from tests.unit.tokenizer_fixture import make_tokenizer_json


def _data(path, dtype="auto", tokenizer="byte"):
    return Data(name="t", path=str(path), dtype=dtype, tokenizer=tokenizer, val_fraction=0.0)


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_txt_byte_round_trip(tmp_path, dtype):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("Hello, wörld!\n")
    b.write_text("second document")
    assert main([str(a), str(b), "--out", str(tmp_path / "out"), "--dtype", dtype]) == 0
    meta = json.loads((tmp_path / "out.json").read_text())
    expected = list("Hello, wörld!\n".encode()) + [0] + list(b"second document") + [0]
    assert meta["dtype"] == dtype and meta["n_tokens"] == len(expected) and meta["n_docs"] == 2
    assert meta["tokenizer"] == "byte" and meta["vocab_size"] == 256 and meta["eot_id"] == 0
    assert meta["source_sha256"] == hashlib.sha256(a.read_bytes() + b.read_bytes()).hexdigest()
    raw = np.fromfile(tmp_path / "out.bin", dtype=dtype)
    assert raw.tolist() == expected
    ds = open_dataset(_data(tmp_path / "out.bin"), vocab_size=256)
    assert ds.tokens.dtype == np.dtype(dtype) and ds.tokens.tolist() == expected and ds.eot_id == 0
    assert len(open_dataset(_data(tmp_path / "out"), vocab_size=256)) == len(expected)  # suffix optional


def test_jsonl_with_tokenizer_json(tmp_path):
    tok_path = make_tokenizer_json(tmp_path / "tokenizer.json")
    docs = ["a single man in want of a wife", "Emma Woodhouse, handsome", "clever, and rich"]
    src = tmp_path / "docs.jsonl"
    src.write_text("\n".join(json.dumps({"body": d, "id": i}) for i, d in enumerate(docs)) + "\n\n")
    assert main([str(src), "--out", str(tmp_path / "hf.bin"), "--field", "body", "--tokenizer", str(tok_path)]) == 0
    tok = load_tokenizer(str(tok_path))
    expected = [t for d in docs for t in tok.encode(d).tolist() + [tok.eot_id]]
    meta = json.loads((tmp_path / "hf.json").read_text())
    assert meta["dtype"] == "uint16" and meta["n_docs"] == 3 and meta["vocab_size"] == tok.vocab_size
    assert meta["tokenizer_sha256"] == tok.sha256 and meta["max_token_id"] == max(expected)
    ds = open_dataset(_data(tmp_path / "hf.bin"), vocab_size=tok.vocab_size)
    assert ds.tokens.tolist() == expected
    assert tok.decode(ds.tokens[: len(tok.encode(docs[0]))]) == docs[0]
    with pytest.raises(ValueError, match="model.vocab_size"):
        open_dataset(_data(tmp_path / "hf.bin"), vocab_size=256)


def test_failure_leaves_no_partial_file_and_keeps_old_output(tmp_path, capsys):
    good = tmp_path / "good.txt"
    good.write_text("old contents")
    assert main([str(good), "--out", str(tmp_path / "out")]) == 0
    old_bin, old_json = (tmp_path / "out.bin").read_bytes(), (tmp_path / "out.json").read_text()
    bad = tmp_path / "bad.jsonl"  # fails on line 3, after two documents were written
    bad.write_text('{"text": "one"}\n{"text": "two"}\n{"content": "three"}\n')
    assert main([str(good), str(bad), "--out", str(tmp_path / "out")]) == 2  # bad input: exit code 2 (axon/errors.py)
    err = capsys.readouterr().err
    assert "bad.jsonl:3" in err and "--field" in err
    assert (tmp_path / "out.bin").read_bytes() == old_bin and (tmp_path / "out.json").read_text() == old_json
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "good.txt", "out.bin", "out.json"]
    assert main([str(bad), "--out", str(tmp_path / "fresh")]) == 2  # bad input: exit code 2 (axon/errors.py)
    assert not list(tmp_path.glob("fresh*"))


def test_input_errors(tmp_path, capsys):
    csv = tmp_path / "x.csv"
    csv.write_text("a,b")
    assert main([str(csv), "--out", str(tmp_path / "o")]) == 2  # bad input: exit code 2 (axon/errors.py)
    assert ".txt or .jsonl" in capsys.readouterr().err
    bad = tmp_path / "x.jsonl"
    bad.write_text("{not json\n")
    assert main([str(bad), "--out", str(tmp_path / "o")]) == 2  # bad input: exit code 2 (axon/errors.py)
    assert "x.jsonl:1: not valid JSON" in capsys.readouterr().err
    tok_path = make_tokenizer_json(tmp_path / "tokenizer.json", eot="<sep>")
    txt = tmp_path / "t.txt"
    txt.write_text("hi")
    assert main([str(txt), "--out", str(tmp_path / "o"), "--tokenizer", str(tok_path)]) == 2  # bad input: exit code 2 (axon/errors.py)
    assert "--eot-token" in capsys.readouterr().err
    assert main([str(txt), "--out", str(tmp_path / "o"), "--tokenizer", str(tok_path), "--eot-token", "<sep>"]) == 0
    assert not list(tmp_path.glob("*.tmp-*"))
