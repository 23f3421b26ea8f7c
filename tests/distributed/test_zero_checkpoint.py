"""Checkpoints stay layout-independent under ZeRO: saved under ZeRO-3 dp=4, loaded under ZeRO-1
dp=2, saved again and loaded with no ZeRO (the data-parallel engine: DataParallel + torch AdamW),
every parameter and Adam state equal to the original at each hop."""
from __future__ import annotations

from pathlib import Path

import torch
from torch.distributed.tensor import DTensor
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from axon import checkpoint as ckpt
from perfmodel.specs import Plan
from tests.distributed import zero_driver as drv


def _local(state: dict) -> dict:
    """{key: full tensor, or [(offsets, tensor)] of the local chunk of a DTensor}."""
    out = {}
    for key, value in state.items():
        if isinstance(value, DTensor):
            out[key] = [(list(c.offsets), value.to_local().clone()) for c in value.__create_chunk_list__()]
        else:
            out[key] = value.clone()
    return out


def save_after_training(plan: Plan, root: str, steps: int) -> None:
    model, engine, grid = drv.make(plan)
    for s in range(steps):
        drv.train_step(model, engine, grid, plan, s)
    ckpt.save(Path(root), steps, *engine.state_dict(), {"step": steps}, keep=0, run_id="zero-test")
    engine.remove()


def load_into_engine_and_resave(plan: Plan, src: str, dst: str) -> tuple[dict, dict]:
    model, engine, grid = drv.make(plan)
    model_state, optim_state = engine.state_dict()
    ckpt.load(Path(src), model_state, optim_state)
    engine.after_load(model_state, optim_state)
    ckpt.save(Path(dst), 1, model_state, optim_state, {}, keep=0, run_id="zero-test")
    engine.remove()
    return _local(model_state), _local(optim_state)


def load_plain(plan: Plan, src: str) -> tuple[dict, dict]:
    model, plain, grid = drv.make(plan)  # zero=0, no offload: the data-parallel engine
    model_state, optim_state = plain.state_dict()
    ckpt.load(Path(src), model_state, optim_state)
    plain.after_load(model_state, optim_state)
    plain.remove()
    return _local(model_state), _local(optim_state)


def _full_reference(path: Path, tmp: Path) -> dict:
    dcp_to_torch_save(path, tmp / "ref.pt")
    state = torch.load(tmp / "ref.pt", weights_only=False)
    return {**{k: v for k, v in state["model"].items()}, **{k: v for k, v in state["optim"].items()}}


def _assert_matches(ref: dict, got: dict) -> int:
    """Compare each rank-local value with the reference; returns how many elements were checked."""
    checked = 0
    for key, value in got.items():
        full = ref[key]
        if isinstance(value, list):
            for offsets, t in value:
                region = full[tuple(slice(o, o + n) for o, n in zip(offsets, t.shape))]
                assert torch.equal(region, t), key
                checked += t.numel()
        else:
            assert torch.equal(full, value), key
            checked += value.numel()
    return checked


def test_zero3_dp4_to_zero1_dp2_to_plain(tmp_path, dist_pools):
    first, second = tmp_path / "z3", tmp_path / "z1"
    dist_pools.run(4, save_after_training, Plan(dp=4, zero=3, micro_batch_size=1), str(first), 3)
    path1 = ckpt.complete_checkpoints(first)[-1]
    ref = _full_reference(path1, tmp_path)
    assert any(v.abs().sum() > 0 for k, v in ref.items() if k.endswith("exp_avg"))

    z1 = dist_pools.run(2, load_into_engine_and_resave, Plan(dp=2, zero=1), str(path1), str(second))
    n_params = sum(v.numel() for k, v in ref.items() if k.endswith(".exp_avg"))
    owned = 0
    for model_state, optim_state in z1:
        _assert_matches(ref, model_state)
        owned += _assert_matches(ref, {k: v for k, v in optim_state.items() if k.endswith(".exp_avg")})
        _assert_matches(ref, optim_state)
    assert owned == n_params  # the two ranks' Adam shards tile every parameter exactly once

    path2 = ckpt.complete_checkpoints(second)[-1]
    for model_state, optim_state in dist_pools.run(2, load_plain, Plan(dp=2), str(path2)):
        assert _assert_matches(ref, model_state) == n_params
        _assert_matches(ref, optim_state)
