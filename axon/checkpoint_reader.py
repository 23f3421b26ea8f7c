"""Reading a checkpoint's DCP state without running code from it.

    metadata = read_metadata(path)       # `.metadata`, unpickled with an allowlist of classes
    read_state(path, {"model": state})   # DCP load through SafeReader and SafePlanner
    state = read_rng(file)               # rng/rank<N>.pt: tensors only (torch.load weights_only)

torch's FileSystemReader reads `.metadata` with a plain `pickle.load`, and DCP's default planner
reads non-tensor entries with `torch.load(weights_only=False)`: either runs whatever a crafted
file names. Here `.metadata` may name only the classes DCP metadata is made of (ALLOWED, what
torch 2.13 writes for Axon's state: plain tensors and DTensors), every shard it
points at is a plain file name inside the checkpoint, non-tensor (pickled) entries are refused
(Axon's state holds tensors only), and tensors are read by DCP with `torch.load(weights_only=True)`.
The manifest check (axon/checkpoint_manifest.py) runs before any of this.
"""
from __future__ import annotations

import io
import pickle
import re
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem

from axon.errors import CheckpointError  # noqa: F401 - raised here, re-exported for the readers' callers

DCP_METADATA = ".metadata"
_DCP_META_MODULE = "torch.distributed.checkpoint.metadata"
ALLOWED: frozenset[tuple[str, str]] = frozenset(
    [(_DCP_META_MODULE, name) for name in ("Metadata", "MetadataIndex", "StorageMeta", "TensorStorageMetadata",
                                           "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
                                           "_MEM_FORMAT_ENCODING")]
    + [("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
       ("torch.serialization", "_get_layout"),  # looks a name up among torch's layouts
       ("pathlib", "PosixPath")]  # StorageMeta.checkpoint_id
    + [("torch", name) for name, value in vars(torch).items() if isinstance(value, torch.dtype)])


class _MetadataUnpickler(pickle.Unpickler):
    """An unpickler that resolves only ALLOWED globals; any other raises CheckpointError."""

    def __init__(self, file: Any, path: Path):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED:
            raise CheckpointError(f"checkpoint file {self.path} refers to {module}.{name}, which DCP metadata "
                                  f"never holds: refused (loading it could run code); delete the checkpoint or "
                                  f"set checkpoint.resume to another one")
        return super().find_class(module, name)

    def persistent_load(self, pid: Any) -> Any:
        raise CheckpointError(f"checkpoint file {self.path} holds a persistent reference, which DCP metadata never "
                              f"holds: refused; delete the checkpoint or set checkpoint.resume to another one")


def read_metadata(path: Path) -> Metadata:
    """The DCP metadata of the checkpoint directory `path`, unpickled with ALLOWED classes only and
    checked (tensor entries only, shards are plain files in `path`, no stream transforms)."""
    file = Path(path) / DCP_METADATA
    try:
        with open(file, "rb") as f:
            metadata = _MetadataUnpickler(f, file).load()
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - a truncated or garbled pickle raises many kinds
        raise CheckpointError(f"checkpoint file {file} is unreadable ({type(e).__name__}: {str(e)[:200]}); it is "
                              f"corrupted: delete the checkpoint or set checkpoint.resume to another one") from e
    _check_metadata(metadata, file)
    return metadata


def _check_metadata(metadata: Any, file: Path) -> None:
    def refuse(what: str) -> CheckpointError:
        return CheckpointError(f"checkpoint file {file} {what}, which Axon never writes: refused; delete the "
                               f"checkpoint or set checkpoint.resume to another one")

    if not isinstance(metadata, Metadata) or not isinstance(metadata.state_dict_metadata, dict) \
            or not isinstance(metadata.storage_data, dict):
        raise refuse(f"holds a {type(metadata).__name__}, not DCP metadata")
    for key, md in metadata.state_dict_metadata.items():
        if isinstance(md, BytesStorageMetadata):
            raise refuse(f"has a pickled (non-tensor) entry {key!r}")
    for info in metadata.storage_data.values():
        name = getattr(info, "relative_path", None)
        if not isinstance(name, str) or Path(name).name != name or name.startswith("."):
            raise refuse(f"points at shard {name!r} outside the checkpoint directory")
        if getattr(info, "transform_descriptors", None):
            raise refuse(f"uses stream transforms {info.transform_descriptors!r}")


class SafeReader(FileSystemReader):
    """FileSystemReader that serves metadata read by `read_metadata` (never `pickle.load`) and
    refuses rank-local metadata files (Axon writes one global `.metadata`)."""

    def __init__(self, path: Path, metadata: Metadata):
        super().__init__(str(path))
        self.metadata = metadata

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if kwargs.get("rank") is not None:
            raise CheckpointError(f"checkpoint {self.path}: rank-local DCP metadata is not read by Axon; "
                                  f"delete the checkpoint or set checkpoint.resume to another one")
        if getattr(self.metadata, "storage_meta", None) is None:
            self.metadata.storage_meta = StorageMeta()
        self.metadata.storage_meta.load_id = self.load_id
        return self.metadata


class SafePlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner that refuses pickled (BYTE_IO) entries instead of `torch.load`ing them
    with weights_only=False (Axon's state is tensors only; tensors are read by the reader)."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        raise CheckpointError(f"checkpoint entry {read_item.dest_index.fqn!r} is a pickled object, which Axon "
                              f"never writes: refused; delete the checkpoint or set checkpoint.resume")


def read_state(path: Path, state: dict[str, Any], metadata: Optional[Metadata] = None) -> None:
    """Fill the tensors of `state` in place from the checkpoint `path` (collective when a process
    group is up, as dcp.load); `metadata`: read_metadata(path) when the caller has it. Errors
    from DCP propagate as DCP raises them (the caller names the checkpoint)."""
    metadata = read_metadata(path) if metadata is None else metadata
    dcp.load(state, storage_reader=SafeReader(path, metadata), planner=SafePlanner())


def read_rng(file: Path) -> dict[str, Any]:
    """The RNG state saved in `file` ({"torch": uint8 tensor, "cuda": [uint8 tensor]}), read with
    torch.load(weights_only=True): only tensors and containers, never code."""
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - UnpicklingError for a refused global, others for garbage
        raise CheckpointError(f"checkpoint file {file} could not be read as tensors only ({_why(e)}): refused "
                              f"(loading it could run code); delete the checkpoint or set checkpoint.resume") from e
    if not isinstance(state, dict) or not isinstance(state.get("torch"), torch.Tensor) \
            or not all(isinstance(t, torch.Tensor) for t in state.get("cuda", [])):
        raise CheckpointError(f"checkpoint file {file} is not an RNG state (a dict with a 'torch' tensor); delete "
                              f"the checkpoint or set checkpoint.resume to another one")
    return state


def _why(e: Exception) -> str:
    """The refused global torch.load names (its message is a page of advice), or the error's first line."""
    found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
    if found:
        return f"it refers to {found.group(1)}"
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
