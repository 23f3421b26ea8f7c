"""A rank's piece of a parameter as a DTensor of the full tensor, read off its `ParamLayout`, so
torch.distributed.checkpoint reshards it between layouts; any gradient engine presents its
tensor-parallel pieces (parameters and same-shaped optimizer states) this way.

    mesh = TensorMesh(grid)                       # the DeviceMesh is built on first use
    state[name] = mesh.to_dtensor(layout, local)  # shares `local`'s memory: a load fills it in place
    local = mesh.from_dtensor(layout, state[name])

The mesh is (tp_col, tp_row, tp_depth) over the grid's existing process groups (no new groups).
The piece's rows are sharded (dim 0) over `split[0]`, its columns (dim 1) over `split[1]`; a
depth slice (`depth_flat`) is a row block of the piece (the model divides so), so it is viewed
as [rows / tp_depth, cols] and sharded again along dim 0 over tp_depth. A layout that is not
sharded is presented as the plain local tensor.
"""
from __future__ import annotations

import itertools
import math
from typing import Any, Optional

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor import Shard as DShard

from launch.grid import Grid, rank_of
from parallel.layout import TP_AXES, ParamLayout


class TensorMesh:
    """The tensor-parallel DeviceMesh of `grid` (one per device type, built lazily) and the
    DTensor view of a piece on it."""

    def __init__(self, grid: Grid):
        self.grid = grid
        self._meshes: dict[str, DeviceMesh] = {}

    def mesh(self, device_type: str) -> DeviceMesh:
        """DeviceMesh (tp_col, tp_row, tp_depth) over the grid's existing groups."""
        if device_type not in self._meshes:
            plan = self.grid.plan
            sizes = [getattr(plan, axis) for axis in TP_AXES]
            ranks = torch.empty(sizes, dtype=torch.int)  # [tp_col, tp_row, tp_depth] global ranks
            for c, r, z in itertools.product(*map(range, sizes)):
                ranks[c, r, z] = rank_of(plan, dict(self.grid.coords(), tp_col=c, tp_row=r, tp_depth=z))
            groups = [self.grid.axis(axis).group for axis in TP_AXES]
            self._meshes[device_type] = DeviceMesh.from_group(groups, device_type, mesh=ranks,
                                                              mesh_dim_names=TP_AXES)
        return self._meshes[device_type]

    def to_dtensor(self, layout: ParamLayout, local: torch.Tensor) -> torch.Tensor:
        """`local` (this rank's piece of a parameter laid out by `layout`, or a same-shaped
        optimizer state) as a DTensor of the full tensor sharing its memory; `local` itself when
        the layout is not sharded."""
        if not layout.sharded:
            return local
        full = layout.full_shape
        row_axis, col_axis = layout.split
        placements: list[Any] = [Replicate()] * len(TP_AXES)
        if row_axis is not None:
            placements[TP_AXES.index(row_axis)] = DShard(0)
        if col_axis is not None:
            placements[TP_AXES.index(col_axis)] = DShard(1)
        view = local
        if layout.depth_flat:  # [rows * cols / tp_depth] -> [rows / tp_depth, cols]
            placements[TP_AXES.index("tp_depth")] = DShard(0)
            view = local.view(-1, math.prod(full[1:]) // _size(self.grid, col_axis))
        stride = torch.empty(full, device="meta").stride()
        return DTensor.from_local(view, self.mesh(local.device.type), placements, run_check=False,
                                  shape=torch.Size(full), stride=stride)

    @staticmethod
    def from_dtensor(layout: ParamLayout, loaded: torch.Tensor) -> torch.Tensor:
        """The local tensor of what `to_dtensor` returned (after a load: the same memory)."""
        local = loaded.to_local() if isinstance(loaded, DTensor) else loaded
        return local.reshape(-1) if layout.depth_flat else local


def _size(grid: Grid, axis: Optional[str]) -> int:
    return grid.axis(axis).size if axis else 1
