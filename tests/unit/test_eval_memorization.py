"""The memorization metrics (axon/eval_memorization.py) on hand-made sequences, and greedy
generation (axon/generate.py) with a stand-in model whose next token is the last one plus 1."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from axon.data import TokenDataset
from axon.eval_memorization import documents, lcs_len, rouge_l, score
from axon.generate import greedy


def test_lcs_and_rouge_l_on_hand_made_sequences():
    assert lcs_len([1, 2, 3, 4], [1, 2, 3, 4]) == 4
    assert lcs_len([1, 2, 3, 4], [2, 4]) == 2
    assert lcs_len([1, 3, 5, 7], [7, 5, 3, 1]) == 1
    assert lcs_len([1, 2], [3, 4]) == 0
    assert lcs_len("ABCBDAB", "BDCABA") == 4  # the textbook example (BCBA)
    assert rouge_l([1, 2, 3, 4], [1, 2, 3, 4]) == 1.0
    assert rouge_l([1, 2], [3, 4]) == 0.0
    assert rouge_l([1, 9, 3, 9], [1, 2, 3, 4]) == pytest.approx(0.5)  # LCS 2 of 4 both ways
    assert rouge_l([1, 2], [1, 2, 3, 4]) == pytest.approx(2 * 1.0 * 0.5 / 1.5)  # P 1, R 1/2


class _PlusOne(torch.nn.Module):
    """Logits that make token (last + 1) mod V the most likely next token."""

    spec = SimpleNamespace(max_seq_len=8)
    V = 50

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        assert tokens.shape[1] <= self.spec.max_seq_len  # greedy crops the context
        return F.one_hot((tokens + 1) % self.V, self.V).float()  # [N, S, V]


def test_greedy_and_exact_match():
    model = _PlusOne()
    assert greedy(model, torch.tensor([[3, 4], [48, 49]]), 3).tolist() == [[5, 6, 7], [0, 1, 2]]
    counting = [np.arange(s, s + 12) % 50 for s in (0, 10, 20)]  # continuations the model predicts
    broken = counting[0].copy()
    broken[9] = 0  # one continuation token wrong
    got = score(model, counting + [broken], prompt=4, length=8)
    assert got["n"] == 4 and got["exact_match"] == 0.75
    assert got["rouge_l"] == pytest.approx((3 + 7 / 8) / 4)


def test_documents_split_at_end_of_document():
    toks = np.array([1, 2, 3, 0, 4, 5, 0, 6, 7, 8, 9, 0], dtype=np.uint8)
    ds = TokenDataset("t", toks, "byte", eot_id=0, val_fraction=0.0)
    assert [d.tolist() for d in documents(ds, 2, 3)] == [[1, 2, 3], [6, 7, 8, 9]]
    assert len(documents(ds, 5, 3)) == 5  # too few documents: evenly spaced windows
