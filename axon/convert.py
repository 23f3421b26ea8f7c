"""`axon convert`: Hugging Face Llama directories to Axon checkpoints and back.

    axon convert Meta-Llama-3.1-8B/ ckpt/llama8b                  # HF (config.json + safetensors) -> Axon
    axon convert runs/ft/checkpoints/step_00000100 hf/ft-8b        # Axon (any layout) -> HF
    axon convert runs/ft/checkpoints hf/ft-8b --dtype bfloat16 --max-shard-size 5GB

HF -> Axon writes the DCP checkpoint of axon/checkpoint.py keyed by Axon parameter names (step 0,
fresh Adam states, no sampler state), which any layout resumes (`checkpoint.resume=<dir>`); the
model's shape is read from config.json. It streams: each tensor is read from the memory-mapped
safetensors (or made, for the zero Adam states) when DCP's writer reaches it and freed once
written, so the host holds about one tensor, never the model (`hf_to_axon`). Axon -> HF reads one parameter at a time out of the sharded
checkpoint (whatever layout wrote it), so the host holds one tensor plus the safetensors shard
being written; it writes `model-0000i-of-0000N.safetensors`, `model.safetensors.index.json` and
`config.json`, which `transformers` loads. Only safetensors and json are read or written.
"""
from __future__ import annotations

import json
import shutil
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.planner import WriteItem

from axon import checkpoint as ckpt
from axon.errors import Parser, guarded
from axon.hf_config import hf_config, spec_from_dir, spec_from_config
from axon.hf_load import INDEX, SliceReader, read_shard
from axon.hf_names import hf_name, to_hf_rows
from axon.model import build
from parallel.layout import replicated
from perfmodel.specs import ModelSpec, Plan

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
UNITS = {"KB": 1e3, "MB": 1e6, "GB": 1e9, "B": 1}


def parse_size(text: str) -> int:
    """`5GB`, `500MB`, `40KB`, `1000` -> bytes."""
    for unit, scale in UNITS.items():
        if text.upper().endswith(unit) and text[:-len(unit)].replace(".", "", 1).isdigit():
            return int(float(text[:-len(unit)]) * scale)
    if text.isdigit():
        return int(text)
    raise ValueError(f"--max-shard-size={text!r} is not a size; write e.g. 5GB, 500MB or 40KB")


@dataclass
class Streamed:
    """What `hf_to_axon` held: bytes read from the safetensors files, the most tensor bytes alive
    at once among those it produced for writing (weights and zero Adam states), and the largest
    single one of them."""

    bytes_read: int = 0
    peak_live_bytes: int = 0
    largest_bytes: int = 0
    live_bytes: int = 0

    def produced(self, t: torch.Tensor) -> torch.Tensor:
        """Count `t` (a fresh tensor handed to the writer) until it is freed."""
        n = t.numel() * t.element_size()
        self.live_bytes += n
        self.peak_live_bytes = max(self.peak_live_bytes, self.live_bytes)
        self.largest_bytes = max(self.largest_bytes, n)
        weakref.finalize(t, self._freed, n)
        return t

    def _freed(self, n: int) -> None:
        self.live_bytes -= n


class _StreamingPlanner(DefaultSavePlanner):
    """DCP's default plan over a state dict of meta tensors (shapes and dtypes only); each tensor's
    data is made when the writer asks for it (`resolve_data`) and dropped once written."""

    def __init__(self, make: Callable[[str], torch.Tensor]):
        super().__init__()
        self.make = make

    def resolve_data(self, write_item: WriteItem) -> Any:
        return self.make(write_item.index.fqn)


def hf_to_axon(hf_dir: Path, out: Path, stats: Streamed | None = None) -> Path:
    """Write the Axon checkpoint of the Hugging Face model in `hf_dir` to `out` (one process),
    streamed: the state dict DCP plans is meta tensors, and each parameter is read from its
    memory-mapped safetensors file (or each Adam state made as zeros) only when the writer
    reaches it, into a file of its own (FileSystemWriter with single_file_per_rank=False keeps a
    file's tensors alive until the file is written, torch/distributed/checkpoint/filesystem.py),
    so the host holds about one tensor at a time; `stats` receives what was held."""
    stats = Streamed() if stats is None else stats
    spec = spec_from_dir(hf_dir)
    model = {n: torch.empty_like(p.detach()) for n, p in build(spec).named_parameters()}  # meta: no memory
    optim: dict[str, torch.Tensor] = {}
    for n, t in model.items():  # the gradient engines' Adam states before the first step
        optim.update({f"{n}.step": torch.empty((), device="meta"), f"{n}.exp_avg": torch.empty_like(t),
                      f"{n}.exp_avg_sq": torch.empty_like(t)})
    reader = SliceReader(hf_dir)

    def make(fqn: str) -> torch.Tensor:
        group, _, name = fqn.partition(".")  # "model.<param>" or "optim.<param>.<state>"
        if group == "model":
            like = model[name]
            t = read_shard(reader, spec, name, replicated(like.shape)).reshape(like.shape).to(like.dtype)
        else:
            t = torch.zeros(optim[name].shape, dtype=optim[name].dtype)
        return stats.produced(t)

    tmp = out.with_name(f".tmp_{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        dcp.save({"model": model, "optim": optim}, storage_writer=FileSystemWriter(str(tmp), single_file_per_rank=False),
                 planner=_StreamingPlanner(make), no_dist=True)
    finally:
        reader.close()
    stats.bytes_read = reader.bytes_read
    meta = {**ckpt.plan_meta(spec, Plan(), None), "step": 0, "world_size": 1, "converted_from": str(hf_dir)}
    ckpt.seal(tmp, meta)  # the manifest of sizes and hashes, then axon.json
    ckpt.install(tmp, out)  # atomic: an existing `out` is replaced only once the new one is complete
    return out


def _param_shapes(metadata: Any) -> dict[str, tuple[int, ...]]:
    """Full shape of every model parameter in a DCP checkpoint's `metadata`, by Axon name."""
    return {key[len("model."):]: tuple(md.size) for key, md in metadata.state_dict_metadata.items()
            if key.startswith("model.") and hasattr(md, "size")}


def _read_param(path: Path, metadata: Any, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """One whole parameter [shape] out of the sharded checkpoint (DCP reassembles the pieces)."""
    t = torch.empty(shape, dtype=torch.float32)
    ckpt.read_state(path, {"model": {name: t}}, metadata)
    return t


def axon_to_hf(path: Path, out: Path, dtype: str = "float32", max_shard_bytes: int = 5 * 10**9) -> Path:
    """Write the Hugging Face directory of the Axon checkpoint at `path` (a step_* directory or a
    checkpoints/ directory, whose newest is taken) to `out`."""
    path = ckpt.resolve(str(path), path)
    ckpt.verify(path)  # sizes and hashes once, before any tensor is read
    spec = ModelSpec(**ckpt.read_meta(path)["model"])
    metadata = ckpt.read_metadata(path)  # once (restricted unpickling, axon/checkpoint_reader.py)
    shapes = _param_shapes(metadata)
    size = DTYPES[dtype].itemsize
    groups: list[list[str]] = [[]]
    used = 0
    for name, shape in shapes.items():  # greedy shards in parameter order
        n = size * int(torch.Size(shape).numel())
        if groups[-1] and used + n > max_shard_bytes:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += n
    out.mkdir(parents=True, exist_ok=True)
    weight_map, total = {}, 0
    for i, names in enumerate(groups):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {hf_name(n): to_hf_rows(spec, n, _read_param(path, metadata, n, shapes[n])).to(DTYPES[dtype]).contiguous()
                   for n in names}
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update({k: file for k in tensors})
    (out / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (out / "config.json").write_text(json.dumps(hf_config(spec, dtype), indent=2))
    return out


def main(argv: list[str]) -> int:
    return guarded("axon convert", _main, argv)


def _main(argv: list[str]) -> int:
    p = Parser(prog="axon convert", description=__doc__.split("\n\n")[0])
    p.add_argument("src", type=Path,
                   help="a Hugging Face Llama directory, or an Axon checkpoint (step_* or checkpoints/)")
    p.add_argument("dst", type=Path, help="the directory to write")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="Axon -> HF: tensor type written")
    p.add_argument("--max-shard-size", default="5GB", help="Axon -> HF: largest safetensors file (default 5GB)")
    args = p.parse_args(argv)
    if (args.src / "config.json").is_file():
        out = hf_to_axon(args.src, args.dst)
        spec = spec_from_config(json.loads((args.src / "config.json").read_text()))
        sets = " ".join(f"model.{k}={v}" for k, v in asdict(spec).items())
        print(f"wrote Axon checkpoint {out}; train from it with checkpoint.resume={out} {sets}")
        return 0
    if not ((args.src / ckpt.META).is_file() or ckpt.complete_checkpoints(args.src)):
        raise ValueError(f"{args.src} is neither a Hugging Face model directory (config.json) nor an Axon "
                         f"checkpoint ({ckpt.META}, or a checkpoints/ directory holding step_*); check the path")
    out = axon_to_hf(args.src, args.dst, args.dtype, parse_size(args.max_shard_size))
    print(f"wrote Hugging Face model {out} (load with transformers' from_pretrained)")
    return 0
