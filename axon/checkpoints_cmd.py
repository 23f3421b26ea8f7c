"""`axon checkpoints`: list a run's checkpoints, or inspect one.

    axon checkpoints runs/default                    # step, layout, size, validity of each
    axon checkpoints --inspect runs/default/checkpoints/step_00000100     # keys, shapes, layout

The layout on disk is axon/checkpoint.py's: `<run dir>/checkpoints/step_<N>/` with DCP shards, the
DCP `.metadata` file and `axon.json` (step, model shape, plan, world size, the manifest of file
sizes and hashes). Only the metadata (through axon/checkpoint_reader.py's restricted unpickler)
and JSON are read, and the file sizes checked against the manifest; no tensor is loaded.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from axon import checkpoint as ckpt
from axon.checkpoint import META, PREFIX
from axon.errors import Parser, guarded

GiB, MiB = 2**30, 2**20


def main(argv: list[str]) -> int:
    return guarded("axon checkpoints", _main, argv)


def _main(argv: list[str]) -> int:
    p = Parser(prog="axon checkpoints", description=__doc__.split("\n\n")[0])
    p.add_argument("path", type=Path, help="a run directory (or its checkpoints/); with --inspect, one checkpoint")
    p.add_argument("--inspect", action="store_true", help="show one checkpoint's keys, shapes and layout")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--debug", action="store_true", help="print the full traceback of an error")
    args = p.parse_args(argv)
    if not args.path.exists():
        raise FileNotFoundError(f"{args.path} does not exist; pass a run directory (run.dir) or a checkpoint")
    if args.inspect:
        info = inspect_checkpoint(args.path)
        print(json.dumps(info, indent=2, default=str) if args.json else format_inspect(info))
        return 0
    rows = list_checkpoints(args.path)
    print(json.dumps(rows, indent=2) if args.json else format_list(rows, args.path))
    return 0


def checkpoint_dirs(path: Path) -> list[Path]:
    """step_* and unfinished .tmp_step_* directories under a run dir or its checkpoints/, oldest first."""
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    found = [d for d in root.iterdir() if d.is_dir() and d.name.removeprefix(".tmp_").startswith(PREFIX)]
    if not found:
        raise FileNotFoundError(f"no checkpoints ({PREFIX}* directories) under {root}; pass a run directory "
                                f"(run.dir) of a run with checkpoint.every or checkpoint.at_end")
    return sorted(found, key=lambda d: d.name.removeprefix(".tmp_"))


def check(path: Path) -> tuple[dict[str, Any], Any, str]:
    """(axon.json, DCP metadata, problem) of a checkpoint; problem is '' when it is usable."""
    if path.name.startswith(".tmp_"):
        return {}, None, "unfinished save (a temporary directory)"
    try:
        meta = json.loads((path / META).read_text())
    except (OSError, json.JSONDecodeError) as e:
        return {}, None, f"{META} missing or unreadable ({type(e).__name__})"
    try:
        dcp_meta = ckpt.read_metadata(path)
    except ckpt.CheckpointError as e:
        return meta, None, str(e)
    try:
        ckpt.verify(path, hashes=False)
    except ckpt.CheckpointError as e:
        return meta, dcp_meta, str(e)
    return meta, dcp_meta, ""


def layout(meta: dict[str, Any]) -> str:
    if "plan" not in meta:
        return "?"
    from axon.tune import knobs, layout_name
    from perfmodel.specs import Plan

    plan = Plan.from_dict(meta["plan"])
    return f"{layout_name(plan)} | {knobs(plan)}"


def list_checkpoints(path: Path) -> list[dict[str, Any]]:
    rows = []
    for d in checkpoint_dirs(path):
        meta, _, problem = check(d)
        size = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
        rows.append({"path": str(d), "step": meta.get("step"), "world_size": meta.get("world_size"),
                     "layout": layout(meta), "bytes": size, "valid": not problem, "problem": problem})
    return rows


def format_list(rows: list[dict[str, Any]], path: Path) -> str:
    lines = [f"checkpoints of {path}:", f"{'step':>8} {'ranks':>5} {'size':>10}  {'valid':<5}  layout"]
    for r in rows:
        valid = "yes" if r["valid"] else f"NO: {r['problem']}"
        lines.append(f"{r['step'] if r['step'] is not None else '?':>8} {r['world_size'] or '?':>5} "
                     f"{r['bytes'] / MiB:>8.2f}MB  {valid:<5}  {r['layout']}  {Path(r['path']).name}")
    return "\n".join(lines)


def inspect_checkpoint(path: Path) -> dict[str, Any]:
    """Keys with shapes and dtypes (from DCP's metadata) and the layout it was saved under."""
    if not (path / META).is_file() and not path.name.startswith(".tmp_"):
        path = checkpoint_dirs(path)[-1]  # a run directory: its newest checkpoint
    meta, dcp_meta, problem = check(path)
    if dcp_meta is None:
        raise ValueError(f"checkpoint {path} cannot be inspected: {problem}")
    tensors = {}
    for key, item in sorted(dcp_meta.state_dict_metadata.items()):
        size = getattr(item, "size", None)
        tensors[key] = {"shape": list(size) if size is not None else None,
                        "dtype": str(item.properties.dtype).removeprefix("torch.") if size is not None else "bytes",
                        "chunks": len(getattr(item, "chunks", []) or [])}
    return {"path": str(path), "step": meta.get("step"), "world_size": meta.get("world_size"),
            "layout": layout(meta), "plan": meta.get("plan"), "model": meta.get("model"),
            "valid": not problem, "problem": problem, "tensors": tensors}


def format_inspect(info: dict[str, Any]) -> str:
    lines = [f"checkpoint {info['path']}: step {info['step']}, saved by {info['world_size']} rank(s)",
             f"layout: {info['layout']}", f"valid: {'yes' if info['valid'] else 'NO: ' + info['problem']}",
             "model: " + ", ".join(f"{k}={v}" for k, v in (info["model"] or {}).items()), "",
             f"{'key':<60} {'shape':<20} {'dtype':<9} chunks"]
    for key, t in info["tensors"].items():
        shape = "x".join(map(str, t["shape"])) if t["shape"] is not None else "-"
        lines.append(f"{key:<60} {shape:<20} {t['dtype']:<9} {t['chunks']}")
    return "\n".join(lines)
