"""A checkpoint's file manifest: the size and sha256 of every file in its directory, recorded at
save (in axon.json, written last) and checked before anything in the checkpoint is read.

    files = record(directory, skip)          # collective: rank r hashes files r, r + world, ...
    files = record_local(directory, skip)    # the same in one process
    verify(path, meta, skip)                 # pure (no process group): listing, sizes, hashes
    verify_collective(path, meta, skip)      # the same, the work split over the ranks

The work is split over the ranks (file i of the sorted manifest is measured, stat and sha256, by
rank i % world; rank 0 lists the directory); at load one all_reduce of a [files, 1 + 32] table
(each row filled by one rank) and one of rank 0's stray file name give every rank the same data,
so nothing from the checkpoint is unpickled before it is verified and every rank raises the same
first error. A missing manifest; a missing, extra or linked file; a size or a digest that differs
is a CheckpointError naming the file.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path, PurePosixPath
from typing import Any, Optional

import torch
import torch.distributed as dist

from axon.checkpoint_reader import CheckpointError

MANIFEST_KEY = "files"  # in axon.json: {relative path: {"bytes": int, "sha256": hex}}
DIGEST_BYTES = 32
FIX = "it was modified or corrupted: delete it or set checkpoint.resume to another checkpoint"
MISSING, ODD = -1, -2  # sizes in a file table row for a file that is absent, or a link / not a regular file
NAME_BYTES = 256  # of a stray file's name sent from rank 0
STRAY_KINDS = ("is a link or not a regular file", "is not in the manifest")


def listing(directory: Path, skip: str) -> tuple[list[str], list[str]]:
    """(regular files, links and other non-files) under `directory` as sorted posix paths
    relative to it, without the top-level file `skip` (axon.json)."""
    files, odd = [], []
    for here, dirs, names in os.walk(directory):
        rel = Path(here).relative_to(directory)
        for name in names + [d for d in dirs if os.path.islink(os.path.join(here, d))]:
            full = Path(here) / name
            path = (rel / name).as_posix()
            if path == skip:
                continue
            (files if full.is_file() and not full.is_symlink() else odd).append(path)
    return sorted(files), sorted(odd)


def sha256(file: Path) -> str:
    with open(file, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _entry(directory: Path, name: str) -> dict[str, Any]:
    file = directory / name
    return {"bytes": file.stat().st_size, "sha256": sha256(file)}


def record_local(directory: Path, skip: str) -> dict[str, dict[str, Any]]:
    """The manifest of `directory` (every file but `skip`), hashed in this process."""
    files, _ = listing(directory, skip)
    return {name: _entry(directory, name) for name in files}


def record(directory: Path, skip: str) -> Optional[dict[str, dict[str, Any]]]:
    """Collective: the manifest of `directory` on rank 0 (None elsewhere); rank r hashes the files
    r, r + world, ... of the sorted listing."""
    rank, world = dist.get_rank(), dist.get_world_size()
    box = [listing(directory, skip)[0] if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)  # rank 0's listing of the files this save just wrote
    mine = {name: _entry(directory, name) for name in box[0][rank::world]}
    parts: Optional[list[Any]] = [None] * world if rank == 0 else None
    dist.gather_object(mine, parts, dst=0)  # our own dicts, just computed: nothing read from the checkpoint
    if parts is None:
        return None
    return {name: part[name] for part in parts for name in part}


def _inside(name: Any) -> bool:
    """`name` is a relative posix path that stays inside the checkpoint directory."""
    if not isinstance(name, str) or not name or "\\" in name:
        return False
    path = PurePosixPath(name)
    return not path.is_absolute() and ".." not in path.parts


def _well_formed(name: Any, entry: Any) -> bool:
    return _inside(name) and isinstance(entry, dict) and isinstance(entry.get("bytes"), int) \
        and isinstance(entry.get("sha256"), str)


def expected(path: Path, meta: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The manifest recorded in the checkpoint's axon.json `meta`."""
    files = meta.get(MANIFEST_KEY)
    if files is None:
        raise CheckpointError(f"checkpoint {path} has no file manifest ('{MANIFEST_KEY}' in its axon.json): it "
                              f"was written by an older Axon or by hand, and cannot be checked before loading; "
                              f"set checkpoint.resume to another checkpoint (or never)")
    bad = [k for k, v in files.items() if not _well_formed(k, v)] if isinstance(files, dict) else ["(all)"]
    if bad:
        raise CheckpointError(f"checkpoint {path}: manifest entry {bad[0]!r} in its axon.json is malformed or "
                              f"points outside the checkpoint; {FIX}")
    return files




def file_row(file: Path, hashes: bool) -> list[int]:
    """[size, 32 sha256 bytes] of `file` (zeros for the digest when not `hashes`; size MISSING or ODD)."""
    if file.is_symlink() or (file.exists() and not file.is_file()):
        return [ODD] + [0] * DIGEST_BYTES
    if not file.exists():
        return [MISSING] + [0] * DIGEST_BYTES
    digest = bytes.fromhex(sha256(file)) if hashes else bytes(DIGEST_BYTES)
    return [file.stat().st_size, *digest]


def stray(path: Path, files: dict[str, Any], skip: str) -> Optional[tuple[str, str]]:
    """The first file under `path` that the manifest does not allow: (name, why), or None."""
    found, odd = listing(path, skip)
    if odd:
        return odd[0], STRAY_KINDS[0]
    extra = sorted(set(found) - set(files))
    return (extra[0], STRAY_KINDS[1]) if extra else None


def problem(path: Path, files: dict[str, dict[str, Any]], table: list[list[int]],
            strayed: Optional[tuple[str, str]], hashes: bool) -> Optional[str]:
    """The first problem, in a fixed order (stray, missing, size, digest), of the checkpoint `path`
    whose sorted manifest `files` measured as `table` ([files, size + 32 digest bytes])."""
    names = sorted(files)
    rows = dict(zip(names, table))
    for name in names:
        if rows[name][0] == ODD:
            return f"checkpoint {path}: file {name} is a link or not a regular file; {FIX}"
    if strayed is not None:
        return f"checkpoint {path}: file {strayed[0]} {strayed[1]}; {FIX}"
    for name in names:
        if rows[name][0] == MISSING:
            return f"checkpoint {path}: file {name} is missing (the manifest lists it); {FIX}"
    for name in names:
        size, want = rows[name][0], files[name]["bytes"]
        if size != want:
            cut = " (truncated)" if size < want else ""
            return f"checkpoint {path}: file {name} has {size} bytes, manifest says {want}{cut}; {FIX}"
    for name in names if hashes else []:
        got, want = bytes(rows[name][1:]).hex(), files[name]["sha256"]
        if got != want:
            return f"checkpoint {path}: file {name} has sha256 {got}, manifest says {want}; {FIX}"
    return None


def verify(path: Path, meta: dict[str, Any], skip: str, hashes: bool = True) -> None:
    """Pure (no process group): the files of checkpoint `path` are exactly its manifest's, with
    the recorded sizes and (`hashes`) sha256 digests; else CheckpointError naming the file."""
    files = expected(path, meta)
    table = [file_row(path / name, hashes) for name in sorted(files)]
    found = problem(path, files, table, stray(path, files, skip), hashes)
    if found:
        raise CheckpointError(found)


def verify_collective(path: Path, meta: dict[str, Any], skip: str) -> None:
    """Collective `verify`: rank r measures (stat + sha256) files r, r + world, ... of the sorted
    manifest, rank 0 also lists the directory; one all_reduce of the table and of rank 0's stray
    file name gives every rank the same data, so every rank raises the same error."""
    files = expected(path, meta)
    names = sorted(files)
    rank, world = dist.get_rank(), dist.get_world_size()
    table = torch.zeros(len(names), 1 + DIGEST_BYTES, dtype=torch.int64)  # [files, size + 32 digest bytes]
    for i in range(rank, len(names), world):
        table[i] = torch.tensor(file_row(path / names[i], hashes=True))
    strayed = torch.zeros(1 + NAME_BYTES, dtype=torch.int64)  # [kind, utf-8 bytes of the name], from rank 0
    if rank == 0:
        strayed = _encode_stray(stray(path, files, skip))
    dist.all_reduce(table)  # each row is filled by exactly one rank
    dist.all_reduce(strayed)  # zeros elsewhere: rank 0's
    found = problem(path, files, table.tolist(), _decode_stray(strayed), hashes=True)
    if found:
        raise CheckpointError(found)


def _encode_stray(found: Optional[tuple[str, str]]) -> torch.Tensor:
    out = torch.zeros(1 + NAME_BYTES, dtype=torch.int64)  # [kind (0: none), name bytes]
    if found is not None:
        name = found[0].encode()[:NAME_BYTES]
        out[0] = 1 + STRAY_KINDS.index(found[1])
        out[1:1 + len(name)] = torch.tensor(list(name), dtype=torch.int64)
    return out


def _decode_stray(t: torch.Tensor) -> Optional[tuple[str, str]]:
    kind, *name = t.tolist()
    if kind == 0:
        return None
    return bytes(b for b in name if b).decode(errors="replace"), STRAY_KINDS[kind - 1]


def any_rank(flag: bool) -> bool:
    """Collective: whether `flag` is true on any rank (one all_reduce MAX; no group: `flag`)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    t = torch.tensor([int(flag)], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
