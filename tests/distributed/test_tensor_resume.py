"""A checkpoint saved under one tensor layout loads under another (and without tensor
parallelism): parameters are DTensors of the full tensors (`parallel.layout_dtensor`), so
torch.distributed.checkpoint reshards them; the loaded values equal the saved ones.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from axon import checkpoint as ckpt
from axon.init import materialize
from axon.model import build
from launch.grid import Grid
from parallel.layout_dtensor import TensorMesh
from parallel.tensor import apply
from perfmodel.specs import ModelSpec, Plan
from tests.distributed.tp_driver import SEED, batch, build_reference, build_tp, local_slice, reference_step, sgd, tp_step

SPEC = dict(n_layers=2)


def _expected() -> dict[str, torch.Tensor]:
    """The full parameters after one SGD step (the single-process run; parity is tested elsewhere)."""
    spec = ModelSpec(**SPEC)
    ref = build_reference(spec)
    reference_step(ref, batch(spec, Plan(), 0))
    sgd(ref)
    return {n: p.detach() for n, p in ref.named_parameters()}


def _save(root: str, plan_kw: dict) -> None:
    spec, plan = ModelSpec(**SPEC), Plan(**plan_kw)
    grid = Grid.build(plan, dist.get_rank(), dist.get_world_size())
    model, tp = build_tp(spec, plan, grid)
    tp_step(model, tp, plan, grid, batch(spec, plan, 0))
    sgd(model)
    mesh = TensorMesh(grid)
    state = {n: mesh.to_dtensor(tp.layouts[n], p.data) for n, p in model.named_parameters()}
    ckpt.save(Path(root), 1, state, {}, {"model": {}}, keep=1, run_id="tp-test")


def _load(root: str, plan_kw: dict) -> float:
    """Worst relative difference between the loaded local pieces and the expected values."""
    spec, plan = ModelSpec(**SPEC), Plan(**plan_kw)
    grid = Grid.build(plan, dist.get_rank(), dist.get_world_size())
    model = build(spec)
    tp = apply(model, spec, plan, grid) if plan.tp > 1 else None
    materialize(model, spec, SEED + 1, torch.device("cpu"),  # other values, so the load must overwrite them
                tp.layouts if tp else None)
    named = dict(model.named_parameters())
    mesh = TensorMesh(grid)
    state = {n: mesh.to_dtensor(tp.layouts[n], p.data) if tp else p.data for n, p in named.items()}
    ckpt.load(ckpt.step_dir(Path(root), 1), state, {})
    want, worst = _expected(), 0.0
    for n, p in named.items():
        with torch.no_grad():
            p.copy_(mesh.from_dtensor(tp.layouts[n], state[n]) if tp else state[n])
        exp = local_slice(want[n], tp.layouts[n].shard).reshape(p.shape) if tp else want[n]
        worst = max(worst, ((p - exp).norm() / exp.norm()).item())
    return worst


def test_layout_change_resume(dist_pools, tmp_path):
    # the saving run: dp=1, so the batch of the step is the data of one shard (like _expected's)
    dist_pools.run(4, _save, str(tmp_path), dict(tp_col=2, tp_row=2))
    for world, plan_kw in ((2, dict(tp_depth=2)), (2, dict(dp=2)), (4, dict(tp_col=2, tp_depth=2))):
        worst = dist_pools.run(world, _load, str(tmp_path), plan_kw)
        assert max(worst) < 1e-6, (plan_kw, worst)
