"""Data parallelism, our own: gradients summed over a group in flat buckets, each launched as
an asynchronous all-reduce the moment its last gradient is accumulated during backward.

Each parameter's `.grad` is a view into its bucket's flat buffer, so autograd accumulates
straight into the buffer and nothing is copied. Buckets hold parameters in reverse registration
order (roughly the order backward produces them) and never mix reduction groups. On the
non-final microbatches of an accumulation (`sync=False`) nothing is reduced; `finish()` launches
any bucket that was not launched (unused parameters) and waits for all before the optimizer.
Gradients are SUMMED: the trainer divides the loss by the global token count. A group of size 1
runs the same code path and skips only the collective itself.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class Bucket:
    params: list[nn.Parameter]
    buffer: torch.Tensor  # flat [numel of all params], grads are views into it
    group: Any
    group_size: int
    ready: set = field(default_factory=set)  # ids of params whose gradient is final in this step
    handle: Any = None


@dataclass
class CommStats:
    """What the last step's reduction cost: bytes sent to all-reduce and time spent waiting."""

    bytes_reduced: int = 0
    launched_in_backward: int = 0
    buckets: int = 0
    wait_s: float = 0.0
    per_step: list[dict] = field(default_factory=list)


class DataParallel:
    """Bucketed, overlapped gradient all-reduce for `groups`: [(params, process group, size)]."""

    def __init__(self, groups: Iterable[tuple[list[nn.Parameter], Any, int]], bucket_mb: float = 4.0,
                 overlap: bool = True):
        self.overlap = overlap
        self.sync = True
        self.buckets: list[Bucket] = []
        self._bucket_of: dict[nn.Parameter, Bucket] = {}
        self.stats = CommStats()
        limit = int(bucket_mb * 2**20)
        for params, group, size in groups:
            current: list[nn.Parameter] = []
            current_bytes = 0
            for p in reversed([p for p in params if p.requires_grad]):
                current.append(p)
                current_bytes += p.numel() * p.element_size()
                if current_bytes >= limit:
                    self._add_bucket(current, group, size)
                    current, current_bytes = [], 0
            if current:
                self._add_bucket(current, group, size)
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for p in self._bucket_of]
        self.zero_grad()

    def _add_bucket(self, params: list[nn.Parameter], group: Any, size: int) -> None:
        dtype, device = params[0].dtype, params[0].device
        buffer = torch.zeros(sum(p.numel() for p in params), dtype=dtype, device=device)
        bucket = Bucket(params, buffer, group, size)
        offset = 0
        for p in params:
            if p.dtype != dtype:
                raise TypeError(f"parameters in one bucket must share a dtype ({p.dtype} vs {dtype})")
            p.grad = buffer[offset:offset + p.numel()].view_as(p)  # autograd accumulates here
            offset += p.numel()
            self._bucket_of[p] = bucket
        self.buckets.append(bucket)

    def zero_grad(self) -> None:
        """Zero the flat buffers (the .grad views stay attached) and re-arm the buckets."""
        for b in self.buckets:
            b.buffer.zero_()
            b.ready.clear()
            b.handle = None

    def _on_grad(self, p: torch.Tensor) -> None:
        if not self.sync:
            return
        b = self._bucket_of[p]
        b.ready.add(id(p))  # a set: a parameter reported twice still counts once
        if len(b.ready) == len(b.params) and b.handle is None and self.overlap:
            self._launch(b)
            self.stats.launched_in_backward += 1

    def _launch(self, b: Bucket) -> None:
        if b.group_size > 1:
            b.handle = dist.all_reduce(b.buffer, group=b.group, async_op=True)
            self.stats.bytes_reduced += b.buffer.numel() * b.buffer.element_size()
        else:
            b.handle = True

    def finish(self) -> None:
        """Launch what backward did not and wait for every bucket; call before the optimizer."""
        start = time.perf_counter()
        for b in self.buckets:
            if b.handle is None:
                self._launch(b)
        for b in self.buckets:
            if b.handle is not True and b.handle is not None:
                b.handle.wait()
        self.stats.wait_s += time.perf_counter() - start
        self.stats.buckets = len(self.buckets)

    def reset_stats(self) -> CommStats:
        old, self.stats = self.stats, CommStats()
        return old

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
