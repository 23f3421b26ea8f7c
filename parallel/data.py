"""Data parallelism, our own: gradients summed over a group in flat buckets, each launched as
an asynchronous all-reduce the moment its last gradient is accumulated during backward.

Each parameter's `.grad` is a view into its bucket's flat buffer, so autograd accumulates
straight into the buffer and nothing is copied. Buckets hold parameters in reverse registration
order (roughly the order backward produces them) and never mix reduction groups. The layout
(`bucket_layout`) is chosen for overlap: at most `bucket_mb` per bucket but at least
MIN_BUCKETS buckets per group (a model smaller than `bucket_mb` would otherwise get one bucket,
launched when backward ends: no overlap at all); and the last bucket, the earliest-registered
parameters (embedding, first layer) whose gradients are ready only as backward ends, is kept
to at most EDGE_MB, since whatever it holds is exposed. (DDP keeps its first bucket small
instead; a small first bucket hides only what it holds, a small last one shortens the exposed
tail: benchmarks/results/dp_vs_ddp_2026-11-22.md, what-if.) On the non-final backwards of an accumulation
(`set_last_backward(False)`) nothing is reduced; `finish()` launches any bucket that was not
launched (unused parameters) and waits for all before the optimizer.
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

# per reduction group: at least MIN_BUCKETS buckets once its gradients exceed EDGE_MB, and the
# last-launched bucket (its reduction cannot overlap backward) holds at most EDGE_MB; one
# definition, shared with the performance model that prices this layout
from perfmodel.estimate import DP_EDGE_MB as EDGE_MB, DP_MIN_BUCKETS as MIN_BUCKETS


def bucket_layout(sizes: list[int], bucket_bytes: int, edge_bytes: int = int(EDGE_MB * 2**20),
                  min_buckets: int = MIN_BUCKETS) -> list[list[int]]:
    """Buckets as lists of indices into `sizes` (bytes per parameter, in launch order: reverse
    registration), contiguous and in order. The last bucket is filled first, from the end, up to
    `edge_bytes`; the rest in launch order up to min(bucket_bytes, total / min_buckets). A
    parameter larger than the limit gets a bucket of its own."""
    n = len(sizes)
    if n == 0:
        return []
    total = sum(sizes)
    limit = max(1, min(bucket_bytes, total // min_buckets if total > edge_bytes else bucket_bytes))
    tail_start, tail_bytes = n, 0
    while tail_start > 0 and tail_bytes + sizes[tail_start - 1] <= min(edge_bytes, limit):
        tail_start -= 1
        tail_bytes += sizes[tail_start]
    if tail_start == n:  # the earliest parameter alone exceeds the edge: it is the last bucket
        tail_start -= 1
    buckets: list[list[int]] = []
    current: list[int] = []
    current_bytes = 0
    for i in range(tail_start):
        current.append(i)
        current_bytes += sizes[i]
        if current_bytes >= limit:
            buckets.append(current)
            current, current_bytes = [], 0
    if current:
        buckets.append(current)
    buckets.append(list(range(tail_start, n)))
    return buckets


@dataclass
class Bucket:
    params: list[nn.Parameter]
    buffer: torch.Tensor  # flat [numel of all params], grads are views into it
    group: Any
    group_size: int
    ready: set = field(default_factory=set)  # ids of params whose gradient is final in this step
    handle: Any = None
    wire: torch.Tensor | None = None  # what the collective reduces: `buffer`, or its reduce-dtype copy


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
                 overlap: bool = True, reduce_dtype: torch.dtype | None = None):
        """`reduce_dtype`: reduce a copy in this dtype and copy the sum back (None: the buffer's
        own dtype; parallel/precision.py `reduce_dtype`)."""
        self.overlap, self.reduce_dtype = overlap, reduce_dtype
        self._last = True  # this backward is the last of the step: reduce what it completes
        self.buckets: list[Bucket] = []
        self._bucket_of: dict[nn.Parameter, Bucket] = {}
        self.stats = CommStats()
        limit = int(bucket_mb * 2**20)
        for params, group, size in groups:
            ordered = list(reversed([p for p in params if p.requires_grad]))  # launch order
            for idx in bucket_layout([p.numel() * p.element_size() for p in ordered], limit):
                self._add_bucket([ordered[i] for i in idx], group, size)
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

    def set_last_backward(self, last: bool) -> None:
        """Whether the coming backward is the step's last for its parameters (default True)."""
        self._last = last

    def _on_grad(self, p: torch.Tensor) -> None:
        if not self._last:
            return
        b = self._bucket_of[p]
        b.ready.add(id(p))  # a set: a parameter reported twice still counts once
        if len(b.ready) == len(b.params) and b.handle is None and self.overlap:
            self._launch(b)
            self.stats.launched_in_backward += 1

    def _launch(self, b: Bucket) -> None:
        if b.group_size > 1:
            cast = self.reduce_dtype not in (None, b.buffer.dtype)
            b.wire = b.buffer.to(self.reduce_dtype) if cast else b.buffer  # [numel]
            b.handle = dist.all_reduce(b.wire, group=b.group, async_op=True)
            self.stats.bytes_reduced += b.wire.numel() * b.wire.element_size()
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
                if b.wire is not b.buffer:
                    b.buffer.copy_(b.wire)  # the reduce-dtype sum back into the fp32 gradients
                b.wire = None
        self.stats.wait_s += time.perf_counter() - start
        self.stats.buckets = len(self.buckets)

    def reset_stats(self) -> CommStats:
        old, self.stats = self.stats, CommStats()
        return old

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
