"""Run-directory outputs and live reporting: `metrics.jsonl` (one object per logged step),
`config.yaml`, `plan.json`, the rank-0 progress display and optional wandb logging.

wandb is optional: missing, offline or failing, it only prints a warning; a run never crashes
because of it.
"""
from __future__ import annotations

import json
import os
import resource
import sys
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
import yaml

from axon.config import Logging


def peak_memory_bytes(device: torch.device) -> int:
    """Peak device memory: CUDA's allocator peak on GPU, the process's peak RSS on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def write_run_files(run_dir: Path, raw_config: dict[str, Any], plan_info: dict[str, Any]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(raw_config, sort_keys=False))
    write_json_atomic(run_dir / "plan.json", plan_info)


class Reporter:
    """Rank 0's metrics sink: appends to metrics.jsonl, drives the progress display and wandb."""

    def __init__(self, run_dir: Path, total_steps: int, start_step: int, logging: Logging,
                 raw_config: dict[str, Any], progress: bool, name: str):
        self.path = run_dir / "metrics.jsonl"
        self.file = self.path.open("a")
        self.total = total_steps
        self._wandb = _start_wandb(logging, run_dir, raw_config, name)
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
        info = (f"loss {record['loss']:.4f}  lr {record['lr']:.2e}  {record['tokens_per_s']:,.0f} tok/s  "
                f"mfu {100 * record['mfu']:.2f}%")
        if self._bar is not None:
            self._bar.update(self._task, completed=record["step"], info=info)
        else:
            print(f"step {record['step']:>5}/{self.total}  {info}  grad_norm {record['grad_norm']:.3f}", flush=True)
        if self._wandb is not None:
            try:
                self._wandb.log(record, step=record["step"])
            except Exception as e:  # noqa: BLE001 - logging must not end a run
                warnings.warn(f"wandb.log failed ({e}); continuing without wandb")
                self._wandb = None

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
        self.file.close()
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
