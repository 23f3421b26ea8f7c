"""Checkpoints belong to a run and are checked before they are read, on 2 gloo ranks: two run ids
in one root never prune, auto-resume or replace each other's; a same-step save replaces the run's own;
a good checkpoint loads bit-exactly (sharded tensors and RNG states); a pickle payload in
`.metadata` or an RNG file, a changed byte in a shard hashed by the other rank or an extra file
raises a CheckpointError on every rank (the same one where the ranks share the data) and the
payload never runs."""
from __future__ import annotations

import pickle
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from axon import checkpoint as ckpt

WORLD = 2


class Payload:
    """Unpickling this creates the file `marker` (what a malicious checkpoint would do, harmlessly)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def states(value: float) -> tuple[dict, dict]:
    """(model_state, optim_state): a [4, 3] weight sharded by rows over the ranks, replicated rest."""
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    full = torch.arange(12, dtype=torch.float32).reshape(4, 3) + value  # [4, 3]
    return ({"w": distribute_tensor(full, mesh, [Shard(0)]), "b": torch.full((3,), value)},
            {"w.step": torch.tensor(value)})


def local(state: dict) -> dict:
    return {k: (v.to_local() if hasattr(v, "to_local") else v).clone() for k, v in state.items()}


def save_as(root: str, step: int, value: float, run_id: str, keep: int) -> torch.Tensor:
    """Save states(value) as run `run_id`; the RNG state the checkpoint records."""
    torch.manual_seed(100 * step + dist.get_rank())
    rng = torch.get_rng_state()
    ckpt.save(Path(root), step, *states(value), {"note": "test"}, keep, run_id)
    return rng


def load_into_zeros(path: str) -> tuple[dict, dict, torch.Tensor]:
    model, optim = states(0.0)
    for t in (*model.values(), *optim.values()):
        (t.to_local() if hasattr(t, "to_local") else t).zero_()
    torch.manual_seed(12345)
    ckpt.load(Path(path), model, optim)
    return local(model), local(optim), torch.get_rng_state()


def two_runs(root: str) -> dict:
    rngs = {}
    for step, run_id, keep in [(1, "a", 2), (2, "a", 2), (3, "b", 1), (4, "b", 1), (5, "a", 2)]:
        rngs[step] = save_as(root, step, float(step), run_id, keep)
    loaded = load_into_zeros(str(ckpt.step_dir(Path(root), 5)))
    rngs[55] = save_as(root, 5, 55.0, "a", 2)  # the same step again: replaced
    replaced = load_into_zeros(str(ckpt.step_dir(Path(root), 5)))
    try:
        save_as(root, 5, 0.0, "b", 1)  # run b may not replace run a's step 5
        refused = ""
    except ckpt.CheckpointError as e:
        refused = str(e)
    return {"rngs": rngs, "loaded": loaded, "replaced": replaced, "expected": local(states(5.0)[0]),
            "expected_replaced": local(states(55.0)[0]), "refused": refused}


def try_load(path: str) -> str:
    try:
        load_into_zeros(path)
    except ckpt.CheckpointError as e:
        return str(e)
    return ""


def test_two_runs_in_one_root_and_bit_exact_resume(tmp_path, dist_pools):
    root = tmp_path / "checkpoints"
    out = dist_pools.run(WORLD, two_runs, str(root))
    names = lambda paths: [p.name for p in paths]  # noqa: E731
    assert names(ckpt.complete_checkpoints(root, "a")) == ["step_00000002", "step_00000005"]  # a's 1 pruned
    assert names(ckpt.complete_checkpoints(root, "b")) == ["step_00000004"]  # b's 3 pruned by b, not a
    assert names(ckpt.foreign_checkpoints(root, "a")) == ["step_00000004"]
    assert ckpt.resolve("auto", root, "a") == ckpt.step_dir(root, 5)
    assert ckpt.resolve("auto", root, "b") == ckpt.step_dir(root, 4)
    assert ckpt.resolve("auto", root, "c") is None
    assert ckpt.resolve(str(ckpt.step_dir(root, 4)), root, "a") == ckpt.step_dir(root, 4)  # a path: any run
    assert ckpt.checkpoint_run_id(ckpt.step_dir(root, 4)) == "b"
    assert sorted(p.name for p in root.iterdir()) == ["step_00000002", "step_00000004", "step_00000005"]
    for rank, got in enumerate(out):
        model, optim, rng = got["loaded"]
        for name, t in got["expected"].items():
            assert torch.equal(model[name], t), (rank, name)
        assert torch.equal(optim["w.step"], torch.tensor(5.0))
        assert torch.equal(rng, got["rngs"][5])
        model, _, rng = got["replaced"]
        for name, t in got["expected_replaced"].items():
            assert torch.equal(model[name], t), (rank, name)
        assert torch.equal(rng, got["rngs"][55])
        assert "belongs to run 'a', not to this run ('b')" in got["refused"]
    ckpt.verify(ckpt.step_dir(root, 5))  # the pure check agrees


def _reseal(path: Path) -> None:
    """Rewrite the manifest after tampering (as an attacker who controls the whole directory would)."""
    meta = ckpt.read_meta(path)
    meta.pop("files")
    ckpt.seal(path, meta)


def test_tampered_and_malicious_checkpoints_fail_on_every_rank(tmp_path, dist_pools):
    root = tmp_path / "checkpoints"
    dist_pools.run(WORLD, save_as, str(root), 1, 1.0, "a", 0)
    path = ckpt.step_dir(root, 1)
    marker = tmp_path / "pwned"
    # one flipped byte in the shard rank 1 hashes: rank 0 raises the same error
    shard = path / "__0_0.distcp"
    good = shard.read_bytes()
    shard.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    msgs = dist_pools.run(WORLD, try_load, str(path))
    assert msgs[0] == msgs[1] and "file __0_0.distcp has sha256" in msgs[0] and "modified or corrupted" in msgs[0]
    shard.write_bytes(good)
    assert dist_pools.run(WORLD, try_load, str(path)) == ["", ""]
    # an extra file, found by rank 0's listing: rank 1 raises the same error
    (path / "rng" / "extra.pt").write_bytes(b"x")
    msgs = dist_pools.run(WORLD, try_load, str(path))
    assert msgs[0] == msgs[1] and "file rng/extra.pt is not in the manifest" in msgs[1]
    (path / "rng" / "extra.pt").unlink()
    # a payload in rank 1's RNG file, manifest rewritten to match
    rng = path / "rng" / "rank1.pt"
    good_rng = rng.read_bytes()
    torch.save({"torch": Payload(marker)}, rng)
    _reseal(path)
    msgs = dist_pools.run(WORLD, try_load, str(path))
    assert "rank1.pt could not be read as tensors only" in msgs[1] and "refused" in msgs[1]
    assert "another rank's RNG file was refused" in msgs[0]
    rng.write_bytes(good_rng)
    # a payload in .metadata, manifest rewritten to match
    (path / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    _reseal(path)
    msgs = dist_pools.run(WORLD, try_load, str(path))
    assert msgs[0] == msgs[1] and ".metadata refers to" in msgs[0] and "refused" in msgs[0]
    assert not marker.exists()
