"""Depth-sharded tensor-parallel weights: gather, prefetch, cache, deferred gradient reduce.

Each 3D tensor-parallel weight is stored as a flat 1/tp_depth slice of its [rows, cols] piece.
`DepthStore.weight(w, phase)` returns the whole piece, all-gathered over `tp_depth`, taking it from a
prefetched or cached copy when there is one. Gathered copies stay valid until
`weights_changed()`, which whoever changes the parameters outside autograd calls (the trainer
after each optimizer step and checkpoint load). The store learns the order in which weights are used
(which use followed each (weight, forward|backward) use last time) and, with `prefetch`,
launches the next gather as soon as a weight is used: forward order in forward, reverse in
backward, recomputed forwards and pipeline schedules included, because the order is observed
rather than assumed. The one misprediction per step is the first weight of the next step,
gathered at the end of backward and discarded by `weights_changed()` after the optimizer step.
Prefetching reads a parameter before its use, so it is off where something else decides when a
parameter holds its values (ZeRO-3 gathers Blocks just in time: `parallel.parallelize`).
`reduce_grad` reduce-scatters a weight gradient over `tp_depth`; with `defer` it only launches
it and queues the handle, and the tensor-parallel op that runs next in backward (the weight's
forward predecessor, which takes this weight as an extra autograd input) collects it with
`take_deferred`, so the reduce-scatter overlaps that op's compute.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from parallel.collectives import Collectives

AXIS = "tp_depth"


@dataclass(eq=False)
class DepthWeight:
    """One depth-sharded parameter `owner.weight`: its [rows, cols] piece, flattened and split
    over depth ([rows*cols/depth]; [rows, cols] when depth is 1). Held through its module
    because materialization replaces the meta parameter."""

    key: int
    owner: torch.nn.Module
    rows: int
    cols: int
    deferred: deque = field(default_factory=deque)  # (handle, flat grad, source) launched, not collected
    uncollected: int = 0  # deferrals whose collector already ran (reduce those synchronously)

    @property
    def param(self) -> torch.nn.Parameter:
        return self.owner.weight


@dataclass
class _Slot:
    handle: Any  # the in-flight all-gather, None once it is done
    buf: torch.Tensor  # [rows*cols] gathered


class DepthStore:
    def __init__(self, comm: Collectives, prefetch: bool, cache: bool):
        self.comm = comm
        self.depth = comm.size(AXIS)
        self.prefetch = prefetch
        self.cache = cache
        self.weights: list[DepthWeight] = []
        self._slots: dict[int, _Slot] = {}
        self._next_after: dict[tuple[int, str], tuple[int, str]] = {}  # (key, phase) -> next use
        self._last: Optional[tuple[int, str]] = None

    def add(self, owner: torch.nn.Module, rows: int, cols: int) -> DepthWeight:
        w = DepthWeight(len(self.weights), owner, rows, cols)
        self.weights.append(w)
        return w

    def _launch(self, w: DepthWeight) -> _Slot:
        buf = torch.empty(w.rows * w.cols, dtype=w.param.dtype, device=w.param.device)
        src = w.param.detach().clone()  # the optimizer may update the parameter while this runs
        return _Slot(self.comm.all_gather(buf, src, AXIS, async_op=True), buf)

    @staticmethod
    def _wait(slot: _Slot) -> None:
        if slot.handle is not None:
            slot.handle.wait()
            slot.handle = None

    def weights_changed(self) -> None:
        """The parameters changed outside autograd (an optimizer step, a checkpoint load): drop
        every gathered copy (in-flight gathers are finished first) so the next use gathers anew."""
        for slot in self._slots.values():
            self._wait(slot)
        self._slots.clear()

    def weight(self, w: DepthWeight, phase: str) -> torch.Tensor:
        """The whole [rows, cols] piece of `w` (gathered over depth); `phase` is "fwd" or "bwd"."""
        if self.depth == 1:
            return w.param.detach()
        slot = self._slots.pop(w.key, None)
        if slot is not None:
            self._wait(slot)
        else:
            buf = torch.empty(w.rows * w.cols, dtype=w.param.dtype, device=w.param.device)
            self.comm.all_gather(buf, w.param.detach(), AXIS)
            slot = _Slot(None, buf)
        if self.cache:
            self._slots[w.key] = slot
        self._used((w.key, phase))
        return slot.buf.view(w.rows, w.cols)

    def _used(self, use: tuple[int, str]) -> None:
        if self._last is not None:
            self._next_after[self._last] = use
        self._last = use
        if not self.prefetch or use not in self._next_after:
            return
        nxt = self._next_after[use][0]
        if nxt not in self._slots:
            self._slots[nxt] = self._launch(self.weights[nxt])

    def reduce_grad(self, w: DepthWeight, grad: torch.Tensor, defer: bool) -> Optional[torch.Tensor]:
        """Sum the [rows, cols] gradient over depth into this rank's flat slice; with `defer`
        launch it and return None (collect it with `take_deferred`)."""
        if self.depth == 1:
            return grad.reshape(w.param.shape)
        out = torch.empty(w.param.shape, dtype=grad.dtype, device=grad.device)
        src = grad.reshape(-1)
        if defer and w.uncollected:
            w.uncollected -= 1
            defer = False
        if not defer:
            self.comm.reduce_scatter(out, src, AXIS)
            return out
        w.deferred.append((self.comm.reduce_scatter(out, src, AXIS, async_op=True), out, src))
        return None

    def take_deferred(self, w: DepthWeight) -> Optional[torch.Tensor]:
        """The deferred gradient of `w`; if backward ran the collector first (no guaranteed order
        between ops that share an input), tell the next deferral of `w` to reduce it itself."""
        if not w.deferred:
            w.uncollected += 1
            return None
        handle, out, _ = w.deferred.popleft()
        handle.wait()
        return out
