"""The training loop: build the model for this rank, apply parallelism, train, log, checkpoint.

    result = run(cfg, grid, device)      # torch.distributed already initialized

Order (DESIGN.md section 3): model on the meta device -> parallel mechanisms (by data, from
outside the model) -> materialize this rank's shards -> data-parallel wrapper -> optimizer.
Every step: microbatches (forward, loss / global tokens, backward; gradients reduced in
overlapped buckets on the last one) -> global-norm clip -> AdamW -> metrics -> checkpoint.
"""
from __future__ import annotations

import json
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from axon import checkpoint as ckpt
from axon.config import RunConfig
from axon.data import BatchSampler, open_dataset
from axon.init import materialize
from axon.metrics import Reporter, peak_memory_bytes, write_run_files
from axon.model import build
from axon.optim import build_optimizer, clip_, global_grad_norm, lr_at, set_lr
from launch.grid import Grid
from parallel.data import DataParallel
from perfmodel.flops import mfu, n_params
from perfmodel.specs import Plan, PlanError

# Plan settings this build cannot run yet: (field, the only supported value, the issue).
NOT_YET: tuple[tuple[str, Any, str], ...] = (
    ("pp", 1, "#4 pipeline parallelism"),
    ("virtual_stages", 1, "#4 pipeline parallelism"),
    ("offload.activations", 0.0, "#4 PipeOffload"),
    ("cp", 1, "#5 context parallelism"),
    ("tp_col", 1, "#3 tensor parallelism"),
    ("tp_row", 1, "#3 tensor parallelism"),
    ("tp_depth", 1, "#3 tensor parallelism"),
    ("sequence_parallel", False, "#3 tensor parallelism"),
    ("zero", 0, "#6 ZeRO"),
    ("offload.optimizer", False, "#6 optimizer offload"),
    ("recompute", "none", "#6 recomputation"),
)


def _plan_value(plan: Plan, name: str) -> Any:
    obj: Any = plan
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def check_implemented(plan: Plan) -> None:
    """Reject layouts this build cannot run yet (before any process group exists)."""
    missing = [f"parallel.{name}={_plan_value(plan, name)!r} ({issue})" for name, only, issue in NOT_YET
               if _plan_value(plan, name) != only]
    if missing:
        raise PlanError("not implemented yet: " + ", ".join(missing) + "; set those back to their defaults "
                        "and use parallel.dp for the ranks")


def implemented_constraints() -> dict[str, Any]:
    """What `parallel=auto` must hold fixed so the search only proposes runnable layouts."""
    return {name: only for name, only, _ in NOT_YET}


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)  # one per step run by this call
    steps: list[int] = field(default_factory=list)
    start_step: int = 0
    preempted: bool = False
    final_checkpoint: Optional[Path] = None


class Trainer:
    """One rank's training state; `run()` drives it."""

    def __init__(self, cfg: RunConfig, grid: Grid, device: torch.device):
        self.cfg, self.grid, self.device = cfg, grid, device
        plan, spec = cfg.plan, cfg.model
        torch.manual_seed(cfg.train.seed)
        self.model = build(spec)
        materialize(self.model, spec, cfg.train.seed, device)
        self.named = dict(self.model.named_parameters())
        self.data_group = grid.group("dp", "cp", "tp_depth")
        self.dp = DataParallel([(list(self.named.values()), grid.group("dp", "cp").group, grid.group("dp", "cp").size)],
                               bucket_mb=plan.bucket_mb, overlap=plan.overlap_grad_reduce)
        self.optimizer = build_optimizer(self.model, cfg.optim, cfg.train.lr)
        self.shard_groups: dict[Any, list[torch.Tensor]] = {None: list(self.named.values())}
        dataset = open_dataset(cfg.data, vocab_size=spec.vocab_size)
        self.train_data = dataset.split("train")
        self.sampler = BatchSampler(len(self.train_data), cfg.train.seq_len, cfg.train.global_batch_size,
                                    cfg.train.seed)
        self.shard = grid.axis("dp").coord * plan.tp_depth + grid.axis("tp_depth").coord
        self.autocast = _autocast(cfg.train.dtype, device)

    # ---- one optimizer step ----
    def step(self, step: int) -> dict[str, float]:
        cfg, plan = self.cfg, self.cfg.plan
        seq = cfg.train.seq_len
        global_tokens = cfg.train.global_batch_size * seq
        set_lr(self.optimizer, lr := lr_at(step, cfg.train.lr, cfg.optim, cfg.train.steps))
        local = self.sampler.local_batch(self.train_data, step, self.shard, plan.data_shards)  # [G/shards, S+1]
        micro = local.split(plan.micro_batch_size)  # m x [mbs, S+1]
        positions = torch.arange(seq, device=self.device)  # [S]
        self.dp.zero_grad()
        loss_sum = torch.zeros((), device=self.device)
        for i, mb in enumerate(micro):
            self.dp.sync = i == len(micro) - 1  # reduce only on the last microbatch
            mb = mb.to(self.device, non_blocking=True)
            inputs, targets = mb[:, :-1], mb[:, 1:]  # [mbs, S] each
            with self.autocast:
                logits = self.model(inputs, positions)  # [mbs, S, V]
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum")
            (loss / global_tokens).backward()
            loss_sum += loss.detach()
        self.dp.finish()
        norm = global_grad_norm(self.shard_groups, _group_or_none(self.grid.axis("pp")))
        clip_(list(self.named.values()), norm, cfg.optim.grad_clip)
        self.optimizer.step()
        if self.data_group.size > 1:
            dist.all_reduce(loss_sum, group=self.data_group.group)
        return {"loss": (loss_sum / global_tokens).item(), "lr": lr, "grad_norm": norm.item()}

    # ---- checkpoints ----
    def _states(self) -> tuple[dict[str, Any], dict[str, Any]]:
        model_state = {name: p.data for name, p in self.named.items()}
        return model_state, ckpt.optimizer_state(self.named, self.optimizer, lambda name, t: t)

    def save(self, step: int) -> Path:
        model_state, optim_state = self._states()
        meta = ckpt.plan_meta(self.cfg.model, self.cfg.plan, self.sampler.state_dict())
        return ckpt.save(self.cfg.run_dir / "checkpoints", step, model_state, optim_state, meta,
                         self.cfg.checkpoint.keep)

    def maybe_resume(self) -> int:
        path = ckpt.resolve(self.cfg.checkpoint.resume, self.cfg.run_dir / "checkpoints")
        if path is None:
            return 0
        meta = ckpt.read_meta(path)
        ckpt.check_compatible(meta, self.cfg.model, path)
        self.sampler.load_state_dict(meta["sampler"])
        model_state, optim_state = self._states()
        ckpt.load(path, model_state, optim_state)
        return int(meta["step"])


def run(cfg: RunConfig, grid: Grid, device: torch.device, preempt: Any = None,
        plan_info: Optional[dict[str, Any]] = None) -> TrainResult:
    """Train `cfg.train.steps` steps (continuing from a checkpoint if one is found)."""
    check_implemented(cfg.plan)
    trainer = Trainer(cfg, grid, device)
    start = trainer.maybe_resume()
    rank0 = dist.get_rank() == 0
    reporter = None
    if rank0:
        info = {"plan": cfg.plan.to_dict(), "world_size": dist.get_world_size(), "n_params": n_params(cfg.model),
                "resumed_from_step": start, **(plan_info or {})}
        write_run_files(cfg.run_dir, cfg.raw, info)
        _truncate_metrics(cfg.run_dir / "metrics.jsonl", start)
        reporter = Reporter(cfg.run_dir, cfg.train.steps, start, cfg.logging, cfg.raw, cfg.train.progress,
                            cfg.run_name)
    result = TrainResult(start_step=start)
    world = dist.get_world_size()
    tokens = cfg.train.global_batch_size * cfg.train.seq_len
    every = cfg.checkpoint.every
    step = start
    try:
        while step < cfg.train.steps:
            t0 = time.perf_counter()
            out = trainer.step(step)
            step += 1
            dt = time.perf_counter() - t0
            result.losses.append(out["loss"])
            result.steps.append(step)
            if reporter is not None and (step % cfg.train.log_every == 0 or step == cfg.train.steps):
                tps = tokens / dt
                reporter.log({"step": step, **out, "tokens_per_s": tps, "step_time_s": dt,
                              "mfu": mfu(cfg.model, cfg.train.seq_len, tps, world, cfg.cluster.peak_flops),
                              "peak_mem_bytes": peak_memory_bytes(device)})
            if preempt is not None and preempt.requested():
                result.final_checkpoint = trainer.save(step)
                result.preempted = True
                break
            if every > 0 and step % every == 0 and step < cfg.train.steps:
                trainer.save(step)
        if not result.preempted and cfg.checkpoint.at_end and step > start:
            result.final_checkpoint = trainer.save(step)
    finally:
        trainer.dp.remove()
        if reporter is not None:
            reporter.close()
    return result


def _truncate_metrics(path: Path, start: int) -> None:
    """Drop records past the resumed step, so a resumed run logs every step exactly once."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= start]
    path.write_text("".join(line + "\n" for line in kept))


def _group_or_none(axis: Any) -> Any:
    return axis.group if axis.size > 1 else None


def _autocast(dtype: str, device: torch.device) -> Any:
    if dtype == "fp32" or (dtype == "auto" and device.type != "cuda"):
        return nullcontext()
    if dtype in ("auto", "bf16"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    raise PlanError(f"train.dtype={dtype!r} must be auto, fp32 or bf16")
