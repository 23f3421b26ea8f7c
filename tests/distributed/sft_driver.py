"""Packed instruction-data runs the SFT parity tests share: a small packed-sft dataset made with
the byte tokenizer (`make_data`), and the single-process loss computed by hand from the model, the
rows and their loss mask (`manual_loss`). Functions here run inside the worker pools."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from axon import sft_data, trainer
from axon.config import RunConfig
from launch.grid import Grid


def make_data(folder: Path, seq_len: int, n_docs: int = 160) -> Path:
    """Prompt/response and messages records (plain rendering) packed for `seq_len`; the output prefix."""
    rng = np.random.default_rng(0)
    words = ["emma", "jane", "wit", "truth", "wife", "rich", "ball", "tea"]
    src = folder / "chat.jsonl"
    with open(src, "w") as f:  # documents of 5..20 bytes: several per row, later ones trained on
        for i in range(n_docs):
            p = " ".join(rng.choice(words, int(rng.integers(1, 3)))) + "?"
            r = " ".join(rng.choice(words, int(rng.integers(1, 3))))
            rec = {"prompt": p, "response": r} if i % 3 else {"messages": [
                {"role": "system", "content": "be. "}, {"role": "user", "content": p},
                {"role": "assistant", "content": r}]}
            f.write(json.dumps(rec) + "\n")
    sft_data.prepare([src], folder / "chat", "byte", seq_len)
    return folder / "chat"


def manual_loss(cfg: RunConfig) -> tuple[float, float]:
    """Single process: (the mean cross-entropy over the kept targets of step 0's rows, from the
    model run on each document alone; the trainer's step-0 loss)."""
    t = trainer.Trainer(cfg, Grid.build(cfg.plan, 0, 1), torch.device("cpu"))
    try:
        batch = t.sampler.local_batch(t.train_data, 0, 0, 1)
        (model,) = t.pipe.chunks.values()
        losses = []
        with torch.no_grad():
            for row, keep, pos in zip(batch.tokens, batch.keep, batch.positions):
                starts = (pos == 0).nonzero().flatten().tolist() + [len(row)]
                for a, b in zip(starts[:-1], starts[1:]):  # each document alone, at positions 0..n-1
                    if b - a < 2:
                        continue  # one token (padding): no target
                    logits = model(row[a:b - 1][None])[0]  # [n-1, V]
                    k = keep[a:b - 1]
                    losses.append(F.cross_entropy(logits[k], row[a + 1:b][k], reduction="none"))
        expected = torch.cat(losses).mean().item()
        got = t.step(0)["loss"]
    finally:
        t.engine.remove()
    return expected, got
