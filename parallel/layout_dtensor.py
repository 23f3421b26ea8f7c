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

ZeRO shards the piece once more (parallel/zero_dtensor.py): `to_zero_dtensor` presents a chunk of
the piece's rows on the mesh (the tensor axes the parameter is not reduced over, then its
reduction group `grad_axes` as one "zero" dimension, sharded along dim 0 in torch.chunk order).
"""
from __future__ import annotations

import itertools
import math
from typing import Optional

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor import Shard as DShard

from launch.grid import Grid, group_ranks, rank_of
from parallel.layout import TP_AXES, ParamLayout


class TensorMesh:
    """The tensor-parallel DeviceMesh of `grid` (one per device type, built lazily) and the
    DTensor view of a piece on it."""

    def __init__(self, grid: Grid):
        self.grid = grid
        self._meshes: dict[tuple, DeviceMesh] = {}

    def mesh(self, device_type: str) -> DeviceMesh:
        """DeviceMesh (tp_col, tp_row, tp_depth) over the grid's existing groups."""
        return self._mesh(device_type, TP_AXES, ())

    def zero_mesh(self, device_type: str, grad_axes: tuple[str, ...]) -> DeviceMesh:
        """DeviceMesh (the tensor axes not in `grad_axes`, in TP_AXES order, then "zero": the
        group over `grad_axes`, ranks ascending as the group orders them) over existing groups."""
        return self._mesh(device_type, tuple(a for a in TP_AXES if a not in grad_axes), grad_axes)

    def _mesh(self, device_type: str, axes: tuple[str, ...], grad_axes: tuple[str, ...]) -> DeviceMesh:
        """The mesh over `axes` (one dimension each), then, with `grad_axes`, a "zero" dimension
        over the group of those axes; built once per device type and dimensions."""
        key = (device_type, axes, grad_axes)
        if key not in self._meshes:
            plan = self.grid.plan
            zero = [self.grid.group(*grad_axes)] if grad_axes else []
            ranks = torch.empty([getattr(plan, a) for a in axes] + [z.size for z in zero], dtype=torch.int)
            for combo in itertools.product(*(range(getattr(plan, a)) for a in axes)):  # global ranks
                base = rank_of(plan, dict(self.grid.coords(), **dict(zip(axes, combo))))
                ranks[combo] = torch.tensor(group_ranks(plan, base, grad_axes) if zero else base, dtype=torch.int)
            groups = [self.grid.axis(a).group for a in axes] + [z.group for z in zero]
            self._meshes[key] = DeviceMesh.from_group(groups, device_type, mesh=ranks,
                                                      mesh_dim_names=axes + (("zero",) if zero else ()))
        return self._meshes[key]

    def to_dtensor(self, layout: ParamLayout, local: torch.Tensor) -> torch.Tensor:
        """`local` (this rank's piece of a parameter laid out by `layout`, or a same-shaped
        optimizer state) as a DTensor of the full tensor sharing its memory; `local` itself when
        the layout is not sharded."""
        if not layout.sharded:
            return local
        view = local
        if layout.depth_flat:  # [rows * cols / tp_depth] -> [rows / tp_depth, cols]
            view = local.view(-1, math.prod(layout.full_shape[1:]) // _size(self.grid, layout.split[1]))
        return self._from_local(layout, view, self.mesh(local.device.type), TP_AXES)

    def to_zero_dtensor(self, layout: ParamLayout, chunk: torch.Tensor) -> torch.Tensor:
        """`chunk` (this rank's ZeRO chunk of the rows of its piece: [rows_k, cols] of the 2-D
        piece as `to_dtensor` views it, or [n_k] of a 1-D one) as a DTensor of the full tensor
        sharing its memory."""
        mesh = self.zero_mesh(chunk.device.type, tuple(layout.grad_axes))
        return self._from_local(layout, chunk, mesh, mesh.mesh_dim_names or ())

    @staticmethod
    def _from_local(layout: ParamLayout, view: torch.Tensor, mesh: DeviceMesh, dims: tuple[str, ...]) -> DTensor:
        """`view` on `mesh` (dimension names `dims`): rows over `split[0]` (then tp_depth when
        depth-flattened, then "zero"), columns over `split[1]`, replicated over the rest."""
        row_axis, col_axis = layout.split
        shards = {row_axis: DShard(0), col_axis: DShard(1), "zero": DShard(0)}
        if layout.depth_flat:
            shards["tp_depth"] = DShard(0)
        placements = [shards.get(d, Replicate()) for d in dims]
        full = layout.full_shape
        stride = torch.empty(full, device="meta").stride()
        return DTensor.from_local(view, mesh, placements, run_check=False, shape=torch.Size(full), stride=stride)

    @staticmethod
    def from_dtensor(layout: ParamLayout, loaded: torch.Tensor) -> torch.Tensor:
        """The local tensor of what `to_dtensor` returned (after a load: the same memory)."""
        local = loaded.to_local() if isinstance(loaded, DTensor) else loaded
        return local.reshape(-1) if layout.depth_flat else local


def _size(grid: Grid, axis: Optional[str]) -> int:
    return grid.axis(axis).size if axis else 1
