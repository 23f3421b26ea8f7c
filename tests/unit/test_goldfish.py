"""The Goldfish mask (axon/goldfish.py): deterministic for equal text wherever it sits, drops
about 1/k of the tokens, equals the plain-Python reference hash; static mode drops exactly every
k-th position; the loss functions give ignored targets no loss and no gradient."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from axon.config import Goldfish
from axon.goldfish import hash_drop, keep_mask, reference_drop
from kernels.cross_entropy import cross_entropy
from parallel.loss_mask import IGNORE_INDEX, mask_targets
from parallel.head_loss import cross_entropy_sum


def _tokens(b: int, n: int, seed: int = 0, vocab: int = 256) -> torch.Tensor:
    return torch.randint(0, vocab, (b, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("k,h", [(2, 1), (4, 13), (7, 5)])
def test_hash_equals_reference(k, h):
    t = _tokens(2, 300, vocab=50_000)
    got = hash_drop(t, k, h)  # [2, 299]
    for row in range(2):
        assert got[row].tolist() == reference_drop(t[row].tolist(), k, h)


def test_equal_text_drops_equal_tokens_wherever_it_sits():
    k, h = 4, 13
    text = _tokens(1, 200, seed=1)[0]
    a = torch.cat((_tokens(1, 37, seed=2)[0], text))[None]  # the text after 37 other tokens
    b = torch.cat((_tokens(1, 90, seed=3)[0], text))[None]  # ... after 90
    # target j of a sample is token j+1; the text's tokens with a full context inside it
    da, db = hash_drop(a, k, h)[0, 36 + h:], hash_drop(b, k, h)[0, 89 + h:]
    assert torch.equal(da, db)
    assert torch.equal(hash_drop(a, k, h), hash_drop(a.clone(), k, h))


@pytest.mark.parametrize("k", [2, 4, 8])
def test_drops_about_one_in_k(k):
    h = 13
    drop = hash_drop(_tokens(4, 20_001, seed=k), k, h)[:, h - 1:]  # the targets with a full context
    assert drop.float().mean().item() == pytest.approx(1 / k, abs=0.01)


def test_targets_without_full_context_are_dropped():
    drop = hash_drop(_tokens(3, 65), 4, 13)
    assert drop[:, :12].all()


def test_static_drops_exactly_every_kth_position():
    keep = keep_mask(_tokens(3, 33), Goldfish(k=4, mode="static"))  # [3, 32]
    dropped = [j for j in range(32) if not keep[0, j]]
    assert dropped == [3, 7, 11, 15, 19, 23, 27, 31]
    assert torch.equal(keep[0], keep[2])


def test_off_keeps_everything_and_bad_settings_are_named():
    assert keep_mask(_tokens(2, 10), Goldfish(k=0)).all()
    for bad, name in [(Goldfish(k=1), "train.goldfish.k"), (Goldfish(k=4, h=0), "train.goldfish.h"),
                      (Goldfish(k=4, mode="x"), "train.goldfish.mode")]:
        with pytest.raises(ValueError, match=name):
            keep_mask(_tokens(1, 5), bad)


def test_cross_entropy_ignores_masked_targets():
    logits = torch.randn(2, 6, 11, requires_grad=True)  # [B, S, V]
    targets = torch.randint(0, 11, (2, 6))
    keep = torch.rand(2, 6) > 0.4
    masked = mask_targets(targets, keep)
    assert (masked[~keep] == IGNORE_INDEX).all()
    loss = cross_entropy_sum(logits, masked)
    expected = F.cross_entropy(logits[keep], targets[keep], reduction="sum")
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert (logits.grad[~keep] == 0).all()


@pytest.mark.parametrize("split", [False, True], ids=["whole", "one-rank-split"])
def test_chunked_cross_entropy_ignores_masked_targets(split):
    """kernels.cross_entropy (the logits' loss of the trainer and of tensor parallelism), by chunks
    of 4 tokens, with and without the vocabulary-split code path (a one-rank group)."""
    logits = torch.randn(2, 6, 11, requires_grad=True)  # [B, S, V], the whole vocabulary on one rank
    targets = torch.randint(0, 11, (2, 6))
    keep = torch.rand(2, 6) > 0.4
    one_rank = (lambda t, op: None) if split else None  # nothing to reduce over one rank
    loss = cross_entropy(logits, mask_targets(targets, keep), 8, chunk=4, vocab_reduce=one_rank)
    ref_logits = logits.detach().clone().requires_grad_(True)
    expected = cross_entropy_sum(ref_logits, mask_targets(targets, keep))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    expected.backward()
    torch.testing.assert_close(logits.grad, ref_logits.grad, rtol=1e-6, atol=1e-7)
