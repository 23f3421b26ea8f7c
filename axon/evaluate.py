"""The validation loss (`train.eval_every`, `train.eval_batches`): which held-out windows it is
computed on, and how it leaves training untouched.

    windows = val_windows(val_data, packed, seq_len, global_batch_size, eval_batches)
    local = windows.local_batch(val_data, j, shard, n_shards)      # eval batch j, this data shard
    with kept_rng(device): ...                                     # forward-only passes

The windows are the data's `val` split (axon/data.py, axon/sft_data.py: the last
data.val_fraction of the tokens or packed rows), cut into non-overlapping windows of seq_len + 1
tokens taken in order, not shuffled: eval batch j is windows j*G .. (j+1)*G - 1 (G the global
batch size), the same on every run, under every layout and seed, and shard i of n takes the
contiguous slice i of it as for training. The loss is the sum of the token losses over the
targets kept (packed data: its prompt and padding mask; the Goldfish mask never applies),
divided by their global count. The trainer runs it with the pipeline's forward-only step
(parallel/pipeline.py `Pipeline.forward`) and the engine's `after_forward`; nothing here draws
random numbers, and `kept_rng` restores the generators anyway, so a run with validation trains
bit-identically to one without.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np
import torch

from axon import sft_data
from axon.data import BatchSampler


class ValWindows(BatchSampler):
    """A BatchSampler whose global batch j is windows j*G .. (j+1)*G - 1 in order (no shuffle)."""

    def __init__(self, n_tokens: int, seq_len: int, global_batch_size: int, batches: int):
        super().__init__(n_tokens, seq_len, global_batch_size, seed=0)
        need = batches * global_batch_size
        if self.n_windows < need:
            raise ValueError(f"train.eval_batches={batches} needs {need} validation windows of train.seq_len + 1 = "
                             f"{self.window} tokens (train.global_batch_size={global_batch_size} each batch) but the "
                             f"val split holds {self.n_windows}; lower train.eval_batches or raise data.val_fraction")
        self.batches = batches

    def global_starts(self, step: int) -> np.ndarray:
        """Token offsets [G] of the windows of eval batch `step` (0 <= step < batches)."""
        if not 0 <= step < self.batches:
            raise ValueError(f"eval batch {step} out of range for train.eval_batches={self.batches}")
        idx = step * self.global_batch_size + np.arange(self.global_batch_size, dtype=np.int64)  # [G]
        return idx * self.window


def val_windows(val_data: Any, packed: bool, seq_len: int, global_batch_size: int, batches: int) -> Any:
    """The sampler of the validation batches: `ValWindows`, or for packed rows a PackedSampler
    whose row order is `ValWindows`' (row r of the val split is its window r)."""
    windows = ValWindows(len(val_data), seq_len, global_batch_size, batches)
    if not packed:
        return windows
    sampler = sft_data.PackedSampler(len(val_data), seq_len, global_batch_size, 0)
    sampler.inner = windows
    return sampler


@contextmanager
def kept_rng(device: torch.device) -> Iterator[None]:
    """Run the block and restore the CPU (and this GPU's) random generators afterwards."""
    gpus = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=gpus):
        yield
