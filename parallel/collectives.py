"""Collective wrappers over the grid's axes that count the bytes they move, per axis and kind.

`Collectives(grid)` runs all-reduce / all-gather / reduce-scatter on one named axis, blocking or
asynchronous (`async_op=True` returns a handle with `wait()`), and adds each message's size to
`bytes[(axis, kind)]` so tests and benchmarks can compare against docs/architecture.md, Formulas. The size
counted is the message size S of the alpha-beta formulas: the tensor for an all-reduce, the
gathered (output) tensor for an all-gather, the input for a reduce-scatter. A group of one rank
runs the same code path, moves nothing and counts nothing.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
import torch.distributed as dist

from launch.grid import Grid

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}


class Done:
    """The handle of a collective that had nothing to do (group of one)."""

    def wait(self) -> None:
        return None


class Collectives:
    def __init__(self, grid: Grid):
        self.grid = grid
        self.bytes: dict[tuple[str, str], int] = defaultdict(int)
        self.calls: dict[tuple[str, str], int] = defaultdict(int)

    def size(self, axis: str) -> int:
        return self.grid.axis(axis).size

    def coord(self, axis: str) -> int:
        return self.grid.axis(axis).coord

    def _count(self, axis: str, kind: str, t: torch.Tensor) -> None:
        self.bytes[(axis, kind)] += t.numel() * t.element_size()
        self.calls[(axis, kind)] += 1

    def reset(self) -> dict[tuple[str, str], int]:
        """Return the byte counts so far and start from zero."""
        out = dict(self.bytes)
        self.bytes.clear()
        self.calls.clear()
        return out

    def all_reduce(self, t: torch.Tensor, axis: str, op: str = "sum", async_op: bool = False) -> Any:
        """In place over `axis`; returns a handle when `async_op`."""
        ax = self.grid.axis(axis)
        if ax.size == 1:
            return Done() if async_op else None
        self._count(axis, "all_reduce", t)
        return dist.all_reduce(t, op=_OPS[op], group=ax.group, async_op=async_op)

    def all_gather(self, out: torch.Tensor, inp: torch.Tensor, axis: str, async_op: bool = False) -> Any:
        """Concatenate every rank's `inp` along dim 0 into `out` (size x inp.numel())."""
        ax = self.grid.axis(axis)
        if ax.size == 1:
            out.copy_(inp.reshape(out.shape))
            return Done() if async_op else None
        self._count(axis, "all_gather", out)
        return dist.all_gather_single(out, inp, group=ax.group, async_op=async_op)

    def reduce_scatter(self, out: torch.Tensor, inp: torch.Tensor, axis: str, async_op: bool = False) -> Any:
        """Sum `inp` over `axis` and keep this rank's chunk (along dim 0) in `out`."""
        ax = self.grid.axis(axis)
        if ax.size == 1:
            out.copy_(inp.reshape(out.shape))
            return Done() if async_op else None
        self._count(axis, "reduce_scatter", inp)
        return dist.reduce_scatter_single(out, inp, group=ax.group, async_op=async_op)

    def gather_along(self, t: torch.Tensor, axis: str, dim: int) -> torch.Tensor:
        """All-gather `t` over `axis`, concatenated along `dim` (blocking)."""
        out, _ = self.start_gather_along(t, axis, dim, async_op=False)
        return out

    def start_gather_along(self, t: torch.Tensor, axis: str, dim: int, async_op: bool = True) -> tuple[torch.Tensor, Any]:
        """`gather_along` launched: (the result, valid once the handle's `wait()` returned; the handle)."""
        n = self.size(axis)
        if n == 1:
            return t, Done()
        src = t.movedim(dim, 0).contiguous()  # [chunk, ...]
        out = torch.empty((n * src.shape[0],) + src.shape[1:], dtype=t.dtype, device=t.device)
        handle = self.all_gather(out, src, axis, async_op=async_op)
        return out.movedim(0, dim), handle if async_op else Done()

    def scatter_along(self, t: torch.Tensor, axis: str, dim: int) -> torch.Tensor:
        """Reduce-scatter `t` over `axis`: sum over ranks, keep this rank's chunk along `dim`."""
        n = self.size(axis)
        if n == 1:
            return t
        src = t.movedim(dim, 0).contiguous()  # [n * chunk, ...]
        res = torch.empty((src.shape[0] // n,) + src.shape[1:], dtype=t.dtype, device=t.device)
        self.reduce_scatter(res, src, axis)
        return res.movedim(0, dim)
