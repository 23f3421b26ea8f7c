"""Loading a checkpoint never runs code from it, and its files are checked against the manifest
first (axon/checkpoint_reader.py, axon/checkpoint_manifest.py): a pickle payload in `.metadata`,
an RNG file, a tensor data file or a pickled (BYTE_IO) entry is refused with CheckpointError and
never runs; a changed, missing or extra file fails the manifest check; an interrupted same-step
replacement leaves a valid checkpoint. One process, no process group."""
from __future__ import annotations

import io
import json
import os
import pickle
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import MetadataIndex
from torch.distributed.checkpoint.planner import LoadItemType, ReadItem

from axon import checkpoint as ckpt
from axon.checkpoint import CheckpointError
from axon.checkpoint_reader import SafePlanner, SafeReader, read_rng


class Payload:
    """Unpickling this creates the file `marker` (what a malicious checkpoint would do, harmlessly)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def state() -> dict:
    g = torch.Generator().manual_seed(0)
    return {"model": {"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g)},
            "optim": {"w.step": torch.tensor(2.0)}}


def zeros_like(s: dict) -> dict:
    return {k: {n: torch.zeros_like(t) for n, t in v.items()} for k, v in s.items()}


def dcp_save(s: dict, path: Path) -> None:
    with warnings.catch_warnings():  # "no process group: saving in a single process" is the intent
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(s, checkpoint_id=str(path))


def write_checkpoint(path: Path, s: dict, run_id: str = "r1") -> Path:
    """A complete checkpoint as `ckpt.save` lays it out, written in this process."""
    dcp_save(s, path)
    (path / "rng").mkdir()
    torch.save({"torch": torch.get_rng_state()}, path / "rng" / "rank0.pt")
    ckpt.seal(path, {"step": 1, "run_id": run_id})
    return path


def read(path: Path, s: dict) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        ckpt.read(path, s)


def test_the_payload_is_live_when_unpickled_plainly(tmp_path):
    pickle.loads(pickle.dumps(Payload(tmp_path / "control")))  # the guard below is what stops it
    assert (tmp_path / "control").is_file()


def test_good_checkpoint_loads_bit_exactly(tmp_path):
    path = write_checkpoint(tmp_path / "step_00000001", state())
    assert set(ckpt.verify(path)["files"]) == {".metadata", "__0_0.distcp", "rng/rank0.pt"}
    got = zeros_like(state())
    read(path, got)
    for part in state():
        for name, t in state()[part].items():
            assert torch.equal(got[part][name], t)
    assert torch.equal(read_rng(path / "rng" / "rank0.pt")["torch"], torch.get_rng_state())


def test_payload_in_metadata_is_refused(tmp_path):
    path = write_checkpoint(tmp_path / "c", state())
    marker = tmp_path / "pwned"
    (path / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(CheckpointError, match="modified or corrupted"):  # the manifest sees it first
        read(path, zeros_like(state()))
    ckpt.seal(path, {"step": 1, "run_id": "r1"})  # an attacker rewrites the manifest too
    with pytest.raises(CheckpointError, match=r"\.metadata refers to .*open.*refused"):
        read(path, zeros_like(state()))
    assert not marker.exists()


def test_payload_in_rng_file_is_refused(tmp_path):
    path = write_checkpoint(tmp_path / "c", state())
    marker = tmp_path / "pwned"
    torch.save({"torch": Payload(marker)}, path / "rng" / "rank0.pt")
    with pytest.raises(CheckpointError, match=r"rank0\.pt could not be read as tensors only.*refused"):
        read_rng(path / "rng" / "rank0.pt")
    assert not marker.exists()


def test_old_format_rng_file_still_reads(tmp_path):
    torch.save({"torch": torch.get_rng_state()}, tmp_path / "rank0.pt")  # what earlier Axon wrote
    assert torch.equal(read_rng(tmp_path / "rank0.pt")["torch"], torch.get_rng_state())


def _with_payload_entry(tmp_path: Path, marker: Path) -> Path:
    """A checkpoint whose entry model.w is a pickled Payload (a BYTE_IO item), as DCP writes one."""
    s = state()
    s["model"]["w"] = Payload(marker)
    return write_checkpoint(tmp_path / "bytes", s)


def test_pickled_entry_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = _with_payload_entry(tmp_path, marker)
    with pytest.raises(CheckpointError, match="pickled .*entry 'model.w'.*refused"):
        read(path, zeros_like(state()))
    # the planner refuses it too, should metadata ever let one through
    with open(path / ".metadata", "rb") as f:
        metadata = pickle.load(f)  # our own test file: its payload is in the shard, not here
    with warnings.catch_warnings(), pytest.raises((CheckpointError, CheckpointException), match="pickled object"):
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(zeros_like(state()), storage_reader=SafeReader(path, metadata), planner=SafePlanner())
    with pytest.raises(CheckpointError, match="pickled object"):
        SafePlanner().load_bytes(ReadItem(LoadItemType.BYTE_IO, MetadataIndex("model.w"), [0], MetadataIndex("model.w"),
                                          [0], [0]), io.BytesIO(pickle.dumps(Payload(marker))))
    assert not marker.exists()


def test_payload_in_tensor_data_is_refused(tmp_path):
    """The shard bytes of tensor model.w replaced by a pickle payload (metadata pointed at it)."""
    marker = tmp_path / "pwned"
    source = _with_payload_entry(tmp_path, marker)
    path = write_checkpoint(tmp_path / "c", state())
    with open(source / ".metadata", "rb") as f:
        bad = pickle.load(f).storage_data[MetadataIndex("model.w")]
    with open(path / ".metadata", "rb") as f:
        metadata = pickle.load(f)
    for index, info in metadata.storage_data.items():
        if index.fqn == "model.w":
            info.offset, info.length = bad.offset, bad.length
    (path / "__0_0.distcp").write_bytes((source / "__0_0.distcp").read_bytes())
    (path / ".metadata").write_bytes(pickle.dumps(metadata))
    ckpt.seal(path, {"step": 1, "run_id": "r1"})
    with pytest.raises(CheckpointError, match="could not load checkpoint"):
        read(path, zeros_like(state()))
    assert not marker.exists()


def test_shard_outside_the_directory_is_refused(tmp_path):
    path = write_checkpoint(tmp_path / "c", state())
    with open(path / ".metadata", "rb") as f:
        metadata = pickle.load(f)
    for info in metadata.storage_data.values():
        info.relative_path = "../elsewhere.distcp"
    (path / ".metadata").write_bytes(pickle.dumps(metadata))
    ckpt.seal(path, {"step": 1, "run_id": "r1"})
    with pytest.raises(CheckpointError, match="outside the checkpoint directory"):
        read(path, zeros_like(state()))


def test_manifest_catches_changed_missing_extra_and_linked_files(tmp_path):
    path = write_checkpoint(tmp_path / "step_00000001", state())
    shard = path / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 1
    shard.write_bytes(bytes(data))
    ckpt.verify(path, hashes=False)  # same size: only the hash sees it
    with pytest.raises(CheckpointError, match=rf"checkpoint {path}: file __0_0.distcp has sha256 [0-9a-f]{{64}}, "
                                              r"manifest says [0-9a-f]{64}; it was modified or corrupted"):
        read(path, zeros_like(state()))
    shard.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="__0_0.distcp has 7 bytes, manifest says"):
        ckpt.verify(path, hashes=False)
    shard.unlink()
    with pytest.raises(CheckpointError, match="__0_0.distcp is missing"):
        ckpt.verify(path)
    path = write_checkpoint(tmp_path / "step_00000002", state())
    (path / "rng" / "rank1.pt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"rng/rank1.pt is not in the manifest"):
        ckpt.verify(path)
    (path / "rng" / "rank1.pt").unlink()
    (path / "rng" / "rank0.pt").rename(tmp_path / "rank0.pt")
    os.symlink(tmp_path / "rank0.pt", path / "rng" / "rank0.pt")
    with pytest.raises(CheckpointError, match=r"rng/rank0.pt is a link"):
        ckpt.verify(path)


def test_manifest_naming_files_outside_the_checkpoint_is_refused(tmp_path):
    path = write_checkpoint(tmp_path / "c", state())
    meta = ckpt.read_meta(path)
    meta["files"]["../outside"] = {"bytes": 1, "sha256": "00"}
    (path / ckpt.META).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="manifest entry '../outside' .* points outside the checkpoint"):
        ckpt.verify(path)


def test_checkpoint_without_manifest_is_refused(tmp_path):
    path = tmp_path / "old"
    dcp_save(state(), path)
    (path / ckpt.META).write_text('{"step": 1}')
    with pytest.raises(CheckpointError, match="no file manifest"):
        read(path, zeros_like(state()))


def test_interrupted_same_step_replacement_leaves_a_valid_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    root.mkdir()
    final = write_checkpoint(root / "step_00000002", state())
    new = state()
    new["model"]["b"] += 1
    # crash after the old one was moved aside, before the new one was renamed into place
    write_checkpoint(root / ".tmp_step_00000002", new)
    os.replace(final, root / ".old_step_00000002")
    assert ckpt.complete_checkpoints(root) == []  # dot-prefixed directories are never complete
    ckpt.recover(root)
    assert ckpt.complete_checkpoints(root) == [final]
    got = zeros_like(state())
    read(final, got)
    assert torch.equal(got["model"]["b"], state()["model"]["b"])  # the old one, whole
    # crash after the rename, before the aside copy was deleted: the new one stands
    os.replace(final, root / ".old_step_00000002")
    os.replace(root / ".tmp_step_00000002", final)
    ckpt.recover(root)
    assert sorted(p.name for p in root.iterdir()) == ["step_00000002"]
    read(final, got)
    assert torch.equal(got["model"]["b"], new["model"]["b"])
