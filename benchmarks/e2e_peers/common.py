"""Shared pieces of the end-to-end peers (benchmarks/e2e_vs_torch.py): the run's shape, the model
(Axon's own definition and initialization), the data (Axon's corpus and batch sampler), the
optimizer (Axon's AdamW parameter groups, learning-rate schedule and clipping threshold), the timed
step loop and the command line every peer script shares.

A peer script runs as `python -m benchmarks.e2e_peers.<script> --variant V --world W --shape JSON
--out FILE`: it starts W local gloo ranks (launch.local.spawn, one CPU thread each) and writes
rank 0's per-step figures as JSON: {"tokens_per_s": [...], "step_time_s": [...], "cpu_s": [...], "loss": [...]}
(cpu_s: rank 0's process CPU seconds in the step, all its threads, as Axon's `host_cpu_s`).
Like Axon's trainer, a step's time is rank 0's wall time from fetching the batch to the end of the
optimizer step, and it contains an all-reduce of the loss (the global loss is reported), so rank 0
cannot finish a step before every rank has finished its forward and backward.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from axon.config import Data
from axon.data import BatchSampler, open_dataset
from axon.init import materialize
from axon.model import GPT, build
from axon.optim import lr_at
from launch.local import spawn
from parallel.data_engine import adamw
from perfmodel.specs import ModelSpec, Optim


@dataclass(frozen=True)
class Shape:
    """Everything Axon and a peer must agree on: model, batch, steps, optimizer."""

    n_layers: int = 4
    d_model: int = 256
    n_heads: int = 8
    n_kv_heads: int = 4
    d_ff: int = 688
    vocab_size: int = 2048
    seq_len: int = 128
    global_batch: int = 16
    micro_batch: int = 2
    warmup: int = 3
    steps: int = 10
    lr: float = 0.003
    seed: int = 1234
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1

    @property
    def total_steps(self) -> int:
        return self.warmup + self.steps

    @property
    def global_tokens(self) -> int:
        return self.global_batch * self.seq_len

    def spec(self) -> ModelSpec:
        return ModelSpec(n_layers=self.n_layers, d_model=self.d_model, n_heads=self.n_heads,
                         n_kv_heads=self.n_kv_heads, d_ff=self.d_ff, vocab_size=self.vocab_size,
                         max_seq_len=self.seq_len, gemm_tuning="off")

    def optim(self) -> Optim:
        return Optim(beta1=self.beta1, beta2=self.beta2, eps=self.eps, weight_decay=self.weight_decay,
                     grad_clip=self.grad_clip, warmup_steps=self.warmup_steps, min_lr_ratio=self.min_lr_ratio)

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def model(shape: Shape, **pieces: Any) -> GPT:
    """Axon's GPT (all layers, or a pipeline piece: layer_ids / has_embedding / has_head) with
    Axon's initialization: every parameter a function of (train.seed, its name), as the trainer's."""
    net = build(shape.spec(), **pieces)
    materialize(net, shape.spec(), shape.seed, torch.device("cpu"))
    return net


class WithLoss(nn.Module):
    """forward(tokens [b, S], targets [b, S]) -> summed cross-entropy, through the model's fused
    head loss (GPT.head_loss, what Axon uses without tensor parallelism), inside one forward call
    so wrappers that hook forward (DDP, FSDP2) see the whole model."""

    def __init__(self, gpt: GPT):
        super().__init__()
        self.gpt = gpt
        self.register_buffer("positions", torch.arange(gpt.spec.max_seq_len), persistent=False)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        positions = self.positions[: tokens.shape[1]]
        return self.gpt.head_loss(self.gpt.blocks(self.gpt.embed(tokens, positions), positions), targets)


class Batches:
    """Axon's training data and sampler (the embedded corpus, byte tokens, train split): step k's
    global batch is the trainer's, and shard i of n its contiguous slice i."""

    def __init__(self, shape: Shape):
        data = open_dataset(Data(), vocab_size=shape.vocab_size).split("train")
        self.data = data
        self.sampler = BatchSampler(len(data), shape.seq_len, shape.global_batch, shape.seed)

    def local(self, step: int, shard: int = 0, n_shards: int = 1) -> torch.Tensor:
        return self.sampler.local_batch(self.data, step, shard, n_shards)  # [G / n_shards, S + 1]


def optimizer(named: dict[str, nn.Parameter], shape: Shape) -> torch.optim.Optimizer:
    """Axon's AdamW: torch AdamW, matrices decayed, norms not (parallel/data_engine.adamw)."""
    return adamw(named, shape.optim())


def set_lr(opt: Any, shape: Shape, step: int) -> None:
    lr = lr_at(step, shape.lr, shape.optim(), shape.total_steps)
    for group in opt.param_groups:
        group["lr"] = lr


def global_loss(loss_sum: torch.Tensor, shape: Shape, group: Any = None) -> float:
    """The step's mean loss over the global batch: one all-reduce (the step's sync point)."""
    total = loss_sum.detach().reshape(1).clone()
    dist.all_reduce(total, group=group)
    return total.item() / shape.global_tokens


def timed_loop(step_fn: Callable[[int], float], shape: Shape) -> dict[str, list[float]]:
    """Run warm-up + timed steps; step_fn(step) -> global loss. Rank 0's figures per step."""
    out: dict[str, list[float]] = {"tokens_per_s": [], "step_time_s": [], "cpu_s": [], "loss": []}
    for step in range(shape.total_steps):
        t0, c0 = time.perf_counter(), time.process_time()
        loss = step_fn(step)
        dt = time.perf_counter() - t0
        out["cpu_s"].append(time.process_time() - c0)  # rank 0's CPU in the step, all its threads
        out["tokens_per_s"].append(shape.global_tokens / dt)
        out["step_time_s"].append(dt)
        out["loss"].append(loss)
    return out


def main(rank_fn: Callable[[str, Shape], dict[str, list[float]]], variants: tuple[str, ...], doc: str) -> None:
    """A peer script's command line: run `rank_fn(variant, shape)` on W local ranks, write rank 0's figures."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--variant", choices=variants, required=True)
    ap.add_argument("--world", type=int, default=4)
    ap.add_argument("--shape", default="{}", help="JSON of common.Shape fields")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    shape = Shape(**json.loads(args.shape))
    results = spawn(args.world, rank_fn, args.variant, shape, timeout_s=900)
    record = {"variant": args.variant, "world": args.world, "shape": json.loads(shape.to_json()),
              "torch": torch.__version__, **results[0]}
    args.out.write_text(json.dumps(record))
