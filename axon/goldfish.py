"""The Goldfish loss mask (Hans et al. 2024, "Be like a Goldfish, Don't Memorize!").

    keep = keep_mask(tokens, cfg.train.goldfish)      # tokens [b, S+1] -> keep [b, S] (bool)
    targets = mask_targets(targets, keep)              # parallel/loss_mask.py: dropped -> ignored

Target j of a sample (the token tokens[j+1]) is dropped from the loss
- `hash` mode: when a hash of the h tokens before it, tokens[j+1-h .. j], is 0 mod k. The same
  text therefore always drops the same tokens, wherever it sits in a window, so a document seen
  many times is still never trained on about 1/k of its tokens. Targets with fewer than h
  tokens before them in the sample (j < h-1) have no full context and are dropped too: keeping
  them would leak, over many repetitions at different window offsets, every token of the text.
- `static` mode: at every k-th position, j % k == k-1.

The mask depends only on the token ids and the positions in the full sequence, so it is computed
on the full sample before context-parallel sharding and is the same under every layout. The hash
is integer arithmetic in int64 (no overflow: every product stays below 2**62); `reference_drop`
is the same hash written as a plain Python loop, which the tests compare against.
"""
from __future__ import annotations

import torch

from axon.config import Goldfish

_M = 2**31 - 1  # the rolling hash's modulus (a prime)
_A = 1_000_003  # its multiplier
_MIX = (0x2C1B3C6D, 0x297A2D39)  # finalizer multipliers (spread the low bits before `% k`)
_MASK32 = 0xFFFFFFFF


def check(cfg: Goldfish) -> None:
    """One line naming the setting when `cfg` cannot run."""
    if cfg.k < 0 or cfg.k == 1:
        raise ValueError(f"train.goldfish.k={cfg.k} must be 0 (off) or >= 2 (k=1 would drop every token)")
    if cfg.h < 1:
        raise ValueError(f"train.goldfish.h={cfg.h} must be >= 1 (the tokens hashed before each target)")
    if cfg.mode not in ("hash", "static"):
        raise ValueError(f"train.goldfish.mode={cfg.mode!r} must be hash or static")


def _finish(x: torch.Tensor) -> torch.Tensor:
    """Avalanche the rolling hash x (int64, values < 2**31) into 32 well-mixed bits."""
    for mul in _MIX:
        x = x ^ (x >> 15)
        x = (x * mul) & _MASK32
    return x ^ (x >> 16)


def hash_drop(tokens: torch.Tensor, k: int, h: int) -> torch.Tensor:
    """bool [b, S]: target j of tokens [b, S+1] is dropped (hash mode, see the module doc)."""
    b, S = tokens.shape[0], tokens.shape[1] - 1
    drop = torch.ones(b, S, dtype=torch.bool, device=tokens.device)  # no full context: dropped
    if S < h:
        return drop
    win = tokens[:, :S].long().unfold(1, h, 1)  # [b, S-h+1, h]: window w is the context of target w+h-1
    x = torch.zeros(win.shape[:2], dtype=torch.int64, device=tokens.device)  # [b, S-h+1]
    for i in range(h):
        x = (x * _A + win[..., i] + 1) % _M
    drop[:, h - 1:] = _finish(x) % k == 0
    return drop


def static_drop(seq_len: int, k: int, device: torch.device | None = None) -> torch.Tensor:
    """bool [S]: every k-th target position (j % k == k-1) is dropped."""
    return torch.arange(seq_len, device=device) % k == k - 1


def keep_mask(tokens: torch.Tensor, cfg: Goldfish) -> torch.Tensor:
    """bool [b, S] for a batch of full samples tokens [b, S+1]: the targets the loss keeps."""
    check(cfg)
    b, S = tokens.shape[0], tokens.shape[1] - 1
    if cfg.k == 0:
        return torch.ones(b, S, dtype=torch.bool, device=tokens.device)
    if cfg.mode == "static":
        return ~static_drop(S, cfg.k, tokens.device).expand(b, S)
    return ~hash_drop(tokens, cfg.k, cfg.h)


def reference_drop(sample: list[int], k: int, h: int) -> list[bool]:
    """`hash_drop` of one sample (a list of S+1 token ids), one target at a time in plain Python."""
    out = []
    for j in range(len(sample) - 1):
        if j < h - 1:
            out.append(True)
            continue
        x = 0
        for t in sample[j + 1 - h: j + 1]:
            x = (x * _A + t + 1) % _M
        for mul in _MIX:
            x ^= x >> 15
            x = (x * mul) & _MASK32
        x ^= x >> 16
        out.append(x % k == 0)
    return out
