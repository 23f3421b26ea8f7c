"""ZeRO units as the engine (parallel/zero.py) holds them: the `Unit` record (a unit's flat
parameter and gradient buffers, this rank's shard of them, the weights of its squares in the
gradient norm, its per-backward state) and how a group of a chunk's parameters becomes units, one
per gradient-reduction group, with the parameters (and under stages 0-1 their `.grad`) turned
into views of the unit's flat buffers. The flat layout itself is parallel/zero_units.py's.

    for unit in make_units("chunk0/block3", named_params, root, stage, grid, layouts): ...  # one at a time
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from launch.grid import Axis, Grid
from parallel.layout import ParamLayout
from parallel.zero_units import Layout, Place, tp_place, whole_place


@dataclass
class Unit:
    name: str
    group: Axis  # the ZeRO group: the ranks this unit's gradients are summed over
    root: bool  # a chunk's parameters outside its Blocks (stage 3: gathered until finish())
    layout: Layout
    full: torch.Tensor  # flat fp32 parameters [padded]; stage 3: freed between uses; mixed 1-2: freed
    shard: torch.Tensor  # my parameters [shard]: a view of `full`; own storage under stage 3 and mixed 1-2
    grad_full: torch.Tensor | None  # stage 0/1: flat gradients [padded]; each .grad is a view
    grad_shard: torch.Tensor  # my reduced gradient [shard]
    norm: list[tuple[int, int, float]]  # [a, b) of my shard and the weight of its squares in the norm
    staging: torch.Tensor | None = None  # stage 2/3: this backward's local gradients [padded]
    pending: int = 0  # parameters whose gradient has not arrived in this backward
    launched: bool = False
    state: str = "ready"  # stage 3: free | gathering | ready
    gather: Any = None  # stage 3: in-flight all-gather
    cfull: torch.Tensor | None = None  # what the forward reads [padded]: `full`, or its compute-dtype copy
    cshard: torch.Tensor | None = None  # stages 1-3: what is gathered into `cfull` [shard]: `shard` or its copy


def make_units(name: str, named: list[tuple[str, nn.Parameter]], root: bool, stage: int, grid: Grid,
               layouts: Mapping[str, ParamLayout]) -> Iterator[Unit]:
    """One unit per gradient-reduction group (`ParamLayout.grad_axes`) among `named` (a Block's
    parameters, or a chunk's others), for ZeRO `stage` (0-3); `layouts` holds every parameter's."""
    by_axes: dict[tuple[str, ...], list[tuple[str, nn.Parameter, Place]]] = {}
    for pname, p in named:
        layout = layouts[pname]
        axes = tuple(layout.grad_axes)
        if layout.sharded:
            place = tp_place(layout, grid)
        else:
            place = whole_place(layout.full_shape)
        by_axes.setdefault(axes, []).append((pname, p, place))
    for axes, entries in by_axes.items():  # made one at a time: the caller may free each before the next
        yield _make_unit(f"{name}/{'x'.join(axes)}", grid.group(*axes), entries, root, stage, grid, layouts)


def _make_unit(name: str, group: Axis, named: list[tuple[str, nn.Parameter, Place]], root: bool, stage: int,
               grid: Grid, layouts: Mapping[str, ParamLayout]) -> Unit:
    d, coord = (1, 0) if stage == 0 else (group.size, group.coord)
    layout = Layout(named, d, coord)
    p0 = named[0][1]
    full = torch.zeros(layout.padded, dtype=p0.dtype, device=p0.device)
    lo, hi = layout.owned()
    with torch.no_grad():
        for s in layout.slots:
            full[s.start:s.stop].copy_(s.param.detach().reshape(-1))
            s.param.data = full[s.start:s.stop].view(s.shape)  # parameters view the flat buffer
    shard = full[lo:hi].clone() if stage == 3 else full[lo:hi]
    grad_full = None
    if stage <= 1:
        grad_full = torch.zeros_like(full)
        for s in layout.slots:
            s.param.grad = grad_full[s.start:s.stop].view(s.shape)  # autograd accumulates here
        grad_shard = grad_full[lo:hi]
    else:
        grad_shard = torch.zeros_like(shard)
    return Unit(name, group, root, layout, full, shard, grad_full, grad_shard,
                _norm_ranges(layout, group, stage, grid, layouts), cfull=full, cshard=shard)


def _norm_ranges(layout: Layout, group: Axis, stage: int, grid: Grid,
                 layouts: Mapping[str, ParamLayout]) -> list[tuple[int, int, float]]:
    """[a, b) ranges of my shard with the weight of their squares in the gradient norm, so that
    summing over dp x cp (ZeRO 1-3) and the tensor group counts every element once: a piece
    held (after ZeRO sharding) by r ranks of those groups weighs 1/r. A parameter in n
    distinct pieces (`ParamLayout.pieces`) over t tensor ranks has each piece on t/n of them,
    of which the ZeRO group (dp x cp x g tensor ranks) covers g: r = (t/n)/g."""
    g = group.size // grid.group("dp", "cp").size if stage >= 1 else 1
    tp = grid.group("tp_col", "tp_row", "tp_depth").size
    lo = layout.owned()[0]
    out: list[tuple[int, int, float]] = []
    for s, a, b in layout.pieces():
        w = layouts[s.name].pieces(grid.plan) * g / tp
        a, b = s.start + a - lo, s.start + b - lo
        if out and out[-1][1] == a and out[-1][2] == w:
            a = out.pop()[0]
        out.append((a, b, w))
    return out
