"""Start from Hugging Face Llama weights, streamed: each rank reads only the slices its layout needs.

    reader = SliceReader(Path(hf_dir))                     # memory-maps the *.safetensors shards
    load_params(reader, named, layouts, spec)              # after materialize, before the grad engine
    reader.bytes_read                                      # what this rank read (the tests check it)

Every parameter's `ParamLayout` (parallel/layout.py) says which block of its full tensor's 2-D view
this rank holds (`shard.rows`, `shard.cols`) and, when weights are sharded again over tp_depth,
which `flat` range of that block; only the rows covering that range are read, with safetensors'
`get_slice` on the memory-mapped file, so the host holds the rank's shard plus one slice. wq / wk
rows are taken in Axon's interleaved RoPE order (axon/hf_names.py): the rows of whole heads are
read and reordered. Only safetensors are read (never pickle), and file names from the index are
refused when they leave the directory.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import safe_open

from axon.hf_config import HFError, read_json, safe_child
from axon.hf_names import hf_name, hf_rows
from parallel.layout import ParamLayout, replicated
from perfmodel.specs import ModelSpec

INDEX, SINGLE = "model.safetensors.index.json", "model.safetensors"
PREFIX = "hf:"


class SliceReader:
    """Reads row/column blocks of the tensors of a Hugging Face directory, counting the bytes."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        if (self.dir / INDEX).is_file():
            weight_map = read_json(self.dir, INDEX).get("weight_map") or {}
        elif (self.dir / SINGLE).is_file():
            with safe_open(str(self.dir / SINGLE), framework="pt") as f:
                weight_map = {k: SINGLE for k in f.keys()}
        else:
            raise HFError(f"{self.dir} holds neither {INDEX} nor {SINGLE}; save the model with "
                          f"save_pretrained(..., safe_serialization=True) (pickled .bin weights are refused)")
        self.files = {name: safe_child(self.dir, file) for name, file in weight_map.items()}
        self._open: dict[Path, Any] = {}
        self.bytes_read = 0

    def _handle(self, name: str) -> Any:
        if name not in self.files:
            raise HFError(f"tensor {name} is missing from {self.dir}; the checkpoint does not match its config.json")
        path = self.files[name]
        if path not in self._open:
            self._open[path] = safe_open(str(path), framework="pt")
        return self._open[path]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def read(self, name: str, rows: slice, cols: slice) -> torch.Tensor:
        """Rows x cols of tensor `name` (1-D tensors: rows only) -> [rows, cols] (or [rows])."""
        sl = self._handle(name).get_slice(name)
        out = sl[rows] if len(sl.get_shape()) == 1 else sl[rows, cols]
        self.bytes_read += out.numel() * out.element_size()
        return out

    def close(self) -> None:
        self._open.clear()


def init_dir(init: str) -> Path | None:
    """The Hugging Face directory of `model.init` (hf:<dir>), None for random initialization."""
    if init == "random":
        return None
    if not init.startswith(PREFIX) or not init[len(PREFIX):]:
        raise HFError(f"model.init={init!r} must be random or hf:<directory of a Hugging Face Llama model>")
    return Path(init[len(PREFIX):]).expanduser()


def read_shard(reader: SliceReader, spec: ModelSpec, name: str, layout: ParamLayout) -> torch.Tensor:
    """This rank's piece of Axon parameter `name` (as `layout.shard` describes it), read from HF."""
    src, shape = hf_name(name), layout.full_shape
    if reader.shape(src) != shape:
        raise HFError(f"{src} in {reader.dir} has shape {list(reader.shape(src))} but the model needs "
                      f"{list(shape)}; the model.* settings do not match the checkpoint's config.json")
    rows_n = shape[0]
    cols_n = shape[1] if len(shape) > 1 else 1
    shard = layout.shard
    r0, r1, rs = shard.rows.indices(rows_n)
    c0, c1, cs = shard.cols.indices(cols_n)
    if rs != 1 or cs != 1:
        raise HFError(f"strided shard {shard} of {name} cannot be streamed")
    width = c1 - c0
    lo, hi = 0, (r1 - r0) * width  # the flat range of the [rows, cols] block this rank keeps
    if shard.flat is not None:
        lo, hi, _ = shard.flat.indices(hi)
    b0, b1 = r0 + lo // width, r0 + -(-hi // width)  # only the block rows covering [lo, hi)
    idx = hf_rows(spec, name, b0, b1)  # [b1 - b0] HF rows, or None (same order)
    if idx is None:
        piece = reader.read(src, slice(b0, b1), slice(c0, c1))
    else:  # RoPE rows: read each contiguous run of the HF rows needed, then put them in Axon order
        order = torch.argsort(idx)
        rows = idx[order]  # [b1 - b0] ascending
        ends = (torch.nonzero(rows[1:] - rows[:-1] != 1).flatten() + 1).tolist() + [len(rows)]
        starts = [0] + ends[:-1]
        runs = [reader.read(src, slice(int(rows[s]), int(rows[e - 1]) + 1), slice(c0, c1))
                for s, e in zip(starts, ends)]
        piece = torch.cat(runs)[torch.argsort(order)]  # [b1 - b0, cols]
    piece = piece.reshape(-1)[lo - (b0 - r0) * width: hi - (b0 - r0) * width]  # [kept elements]
    return piece


def load_params(reader: SliceReader, named: Mapping[str, torch.nn.Parameter],
                layouts: Mapping[str, ParamLayout], spec: ModelSpec) -> None:
    """Overwrite every parameter in `named` with its slice of the Hugging Face weights."""
    with torch.no_grad():
        for name, p in named.items():
            layout = layouts.get(name) or replicated(p.shape)
            p.copy_(read_shard(reader, spec, name, layout).reshape(p.shape).to(p.dtype))


def init_from(init: str, named: Mapping[str, torch.nn.Parameter], layouts: Mapping[str, ParamLayout],
              spec: ModelSpec) -> bool:
    """`model.init`: load this rank's slices from hf:<dir> (True), or leave the random init (False)."""
    directory = init_dir(init)
    if directory is None:
        return False
    reader = SliceReader(directory)
    try:
        load_params(reader, named, layouts, spec)
    finally:
        reader.close()
    return True

