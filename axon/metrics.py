"""Run-directory outputs and live reporting: `metrics.jsonl` (one object per logged step),
`config.yaml`, `plan.json`, the rank-0 progress display (a bar on a terminal, else a line per
logged step with elapsed time and ETA), throughput over a window, the device peak MFU is measured
against, and optional wandb / TensorBoard logging.

wandb and TensorBoard are optional: missing, offline or failing, they only print a warning; a run
never crashes because of them.
"""
from __future__ import annotations

import json
import os
import resource
import sys
import time
import warnings
from collections import deque
from pathlib import Path
from typing import Any, Optional

import torch
import yaml

from axon.config import Logging, TensorBoard
from perfmodel.specs import Cluster

WINDOW = 20  # steps the smoothed tokens/s averages over


def device_peak_flops(cluster: Cluster, ranks_sharing: int) -> float:
    """The peak FLOP/s one rank can reach: the device's on GPUs; on a CPU preset (compute_units > 0)
    the machine's measured peak divided over the ranks sharing it. There `peak_flops` is a rank's
    rate while gpus_per_node ranks share compute_units processors (perfmodel/specs.py Cluster), so
    the machine's peak is peak_flops x gpus_per_node (docs/architecture.md, Formulas: MFU)."""
    if cluster.compute_units <= 0:
        return cluster.peak_flops
    machine = cluster.peak_flops * cluster.ranks_per_unit * cluster.compute_units
    return machine / max(1, ranks_sharing)


class Throughput:
    """Tokens/s over the last `window` steps (the global figure and per device)."""

    def __init__(self, window: int = WINDOW):
        self.steps: deque[tuple[float, float]] = deque(maxlen=window)

    def add(self, tokens: float, seconds: float) -> None:
        self.steps.append((tokens, seconds))

    def figures(self, devices: int) -> dict[str, float]:
        tokens, seconds = sum(t for t, _ in self.steps), sum(s for _, s in self.steps)
        smooth = tokens / seconds if seconds > 0 else 0.0
        return {"tokens_per_s_smooth": smooth, "tokens_per_s_per_device": smooth / max(1, devices)}


def clock(seconds: float) -> str:
    seconds = int(max(0.0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def peak_memory_bytes(device: torch.device) -> int:
    """Peak device memory: CUDA's allocator peak on GPU, the process's peak RSS on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def write_text_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` so a reader (or a crash) sees the old file or the new, never half."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, default=str) + "\n")


def write_run_files(run_dir: Path, raw_config: dict[str, Any], plan_info: dict[str, Any]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "config.yaml", yaml.safe_dump(raw_config, sort_keys=False))
    write_json_atomic(run_dir / "plan.json", plan_info)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl; a torn line (a crash mid-write) is skipped, not fatal."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            out.append(record)
    return out


def truncate_metrics(path: Path, start: int) -> None:
    """Keep the records up to the resumed step `start` (atomically), so a resumed run logs every
    step exactly once; torn lines are dropped."""
    if path.is_file():
        kept = [r for r in read_metrics(path) if r["step"] <= start]
        write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))


class Reporter:
    """Rank 0's metrics sink: appends to metrics.jsonl, drives the progress display and wandb."""

    def __init__(self, run_dir: Path, total_steps: int, start_step: int, logging: Logging,
                 raw_config: dict[str, Any], progress: bool, name: str, tensorboard: Optional[TensorBoard] = None):
        self.path = run_dir / "metrics.jsonl"
        self.file = self.path.open("a")
        self.total, self.start, self.t0 = total_steps, start_step, time.monotonic()
        self._wandb = _start_wandb(logging, run_dir, raw_config, name)
        self._tb = _start_tensorboard(tensorboard, run_dir) if tensorboard is not None else None
        self._bar = None
        self._task = None
        if progress and sys.stdout.isatty():
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(TextColumn("[bold]train"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                                 TextColumn("{task.fields[info]}"), TimeRemainingColumn())
            self._task = self._bar.add_task("train", total=total_steps, completed=start_step, info="")
            self._bar.start()

    def log(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        tps = record.get("tokens_per_s_smooth", record["tokens_per_s"])
        info = f"loss {record['loss']:.4f}  lr {record['lr']:.2e}  {tps:,.0f} tok/s  mfu {100 * record['mfu']:.2f}%"
        if self._bar is not None:
            self._bar.update(self._task, completed=record["step"], info=info)
        else:  # a log file (Slurm): a plain line with elapsed time and ETA
            elapsed = time.monotonic() - self.t0
            done = max(1, record["step"] - self.start)
            eta = elapsed / done * (self.total - record["step"])
            print(f"step {record['step']:>5}/{self.total}  {info}  grad_norm {record['grad_norm']:.3f}  "
                  f"elapsed {clock(elapsed)}  eta {clock(eta)}", flush=True)
        if self._tb is not None:
            self._tb_log(record)
        if self._wandb is not None:
            try:
                self._wandb.log(record, step=record["step"])
            except Exception as e:  # noqa: BLE001 - logging must not end a run
                warnings.warn(f"wandb.log failed ({e}); continuing without wandb")
                self._wandb = None

    def _tb_log(self, record: dict[str, Any]) -> None:
        try:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(f"train/{key}", value, record["step"])
            self._tb.flush()
        except Exception as e:  # noqa: BLE001 - logging must not end a run
            warnings.warn(f"TensorBoard logging failed ({e}); continuing without it")
            self._tb = None

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
        self.file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            try:
                self._wandb.finish()
            except Exception as e:  # noqa: BLE001
                warnings.warn(f"wandb.finish failed ({e})")


def _start_wandb(logging: Logging, run_dir: Path, raw_config: dict[str, Any], name: str) -> Optional[Any]:
    if logging.wandb_mode == "disabled":
        return None
    try:
        import wandb
    except ImportError:
        warnings.warn("logger.wandb.mode is set but wandb is not installed (pip install wandb); logging to "
                      "metrics.jsonl only")
        return None
    try:
        return wandb.init(project=logging.wandb_project, entity=logging.wandb_entity, name=name,
                          mode=logging.wandb_mode, dir=str(run_dir), config=raw_config, reinit=True)
    except Exception as e:  # noqa: BLE001 - offline/unreachable wandb must not end a run
        warnings.warn(f"wandb.init failed ({e}); logging to metrics.jsonl only")
        return None


def _start_tensorboard(tb: TensorBoard, run_dir: Path) -> Optional[Any]:
    if not tb.enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        warnings.warn("logger.tensorboard.enabled=true but tensorboard is not installed (pip install tensorboard); "
                      "logging to metrics.jsonl only")
        return None
    try:
        return SummaryWriter(log_dir=str(Path(tb.dir) if tb.dir else run_dir / "tensorboard"))
    except Exception as e:  # noqa: BLE001 - an unwritable directory must not end a run
        warnings.warn(f"TensorBoard writer failed ({e}); set logger.tensorboard.dir to a writable directory")
        return None
