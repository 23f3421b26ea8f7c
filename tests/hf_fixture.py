"""Tiny Hugging Face Llama models made locally with `transformers` (random weights, saved as
sharded safetensors), the oracle of the import / export tests; and the reference loss of a batch."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

ROPE_LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}  # wavelengths of head_dim 16 fall in all three bands


def make_llama(path: Path, n_layers: int = 3, tied: bool = False, scaled: bool = True, vocab: int = 256,
               seed: int = 0, shard_size: str = "40KB") -> Path:
    """A random tiny Llama (hidden 64, 4 heads, 2 kv heads) saved under `path`; returns `path`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=n_layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      rms_norm_eps=1e-5, rope_theta=10000.0, rope_scaling=ROPE_LLAMA3 if scaled else None,
                      tie_word_embeddings=tied, initializer_range=0.15)  # peaked logits: a sharp oracle
    model = LlamaForCausalLM(cfg).float()
    with torch.no_grad():  # norms away from 1 so a misplaced norm weight shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path, safe_serialization=True, max_shard_size=shard_size)
    return Path(path)


def hf_logits(path: Path, tokens: torch.Tensor) -> torch.Tensor:
    """transformers' fp32 logits [B, S, V] of `tokens` [B, S] for the model saved at `path`."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(tokens).logits


def hf_loss(path: Path, batch: torch.Tensor) -> float:
    """Mean next-token cross entropy of `batch` [B, S+1] (inputs batch[:, :-1], targets batch[:, 1:])."""
    logits = hf_logits(path, batch[:, :-1])  # [B, S, V]
    return F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()).item()


def global_batch(cfg, step: int = 0) -> torch.Tensor:
    """The whole batch [G, S+1] the trainer of `cfg` (a RunConfig) trains on at `step`."""
    from axon.data import BatchSampler, open_dataset

    data = open_dataset(cfg.data, vocab_size=cfg.model.vocab_size).split("train")
    sampler = BatchSampler(len(data), cfg.train.seq_len, cfg.train.global_batch_size, cfg.train.seed)
    return sampler.local_batch(data, step, 0, 1)


def bytes_read(cfg) -> tuple[int, int, int]:
    """On each rank: (bytes its streaming load read, bytes of its parameter shards, largest single
    parameter read in bytes), building the trainer of `cfg` and loading `cfg.model_init` into it."""
    from dataclasses import replace

    import torch.distributed as dist

    from axon import hf_load
    from axon.trainer import Trainer
    from launch.grid import Grid

    grid = Grid.build(cfg.plan, dist.get_rank(), dist.get_world_size())
    trainer = Trainer(replace(cfg, model_init="random"), grid, torch.device("cpu"))
    reader = hf_load.SliceReader(hf_load.init_dir(cfg.model_init))
    largest = 0
    for name, p in trainer.named.items():
        before = reader.bytes_read
        hf_load.load_params(reader, {name: p}, trainer.layouts, cfg.model)
        largest = max(largest, reader.bytes_read - before)
    shard = sum(p.numel() * p.element_size() for p in trainer.named.values())
    trainer.engine.remove()
    return reader.bytes_read, shard, largest
