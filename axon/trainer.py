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
from axon import memory
from axon.metrics import Reporter, peak_memory_bytes, write_json_atomic, write_run_files
from axon.model import GPT
from axon.optim import build_optimizer, clip_, global_grad_norm, lr_at, set_lr
from launch.grid import Grid
from parallel import context, pipeline, recompute, tensor, zero
from parallel.data import DataParallel
from perfmodel.flops import mfu, n_params
from perfmodel.specs import PlanError

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
        # this rank's pipeline chunks on the meta device; parallelism applied from outside, by
        # data (TP per chunk, CP swaps attention cores); then only this rank's shards materialize
        self.pipe = pipeline.apply(spec, plan, grid, lambda ids, emb, head: GPT(spec, ids, emb, head),
                                   cfg.train.seq_len, timeout_s=cfg.launch.timeout_s)
        chunks = list(self.pipe.chunks.values())
        self.tps = [tensor.apply(chunk, spec, plan, grid) for chunk in chunks] if plan.tp > 1 else []
        self.cp = [context.apply(chunk, spec, plan, grid) for chunk in chunks][0]
        for i, chunk in enumerate(chunks):
            recompute.apply(chunk, plan, self.pipe.recompute_meter)
            tp = self.tps[i] if self.tps else None
            materialize(chunk, spec, cfg.train.seed, device, shards=tp.shards if tp else {},
                        full_shapes=tp.full_shapes if tp else {})
        self.named = self.pipe.named_parameters()
        self.tp_of = {name: tp for tp in self.tps for name in tp.shards}
        self.loss_fn = self.tps[-1].loss_fn if self.tps else _cross_entropy_sum
        self.data_group = grid.group("dp", "cp", "tp_depth")
        self.norm_weights = {name: self._pieces(name) / plan.tp for name in self.named}
        # gradient reduction + optimizer: the ZeRO engine (stages 1-3, optimizer offload) or
        # bucketed data parallelism + AdamW; both expose zero_grad / sync / finish / remove
        self.engine = zero.apply(chunks, plan, grid, cfg.optim, self.tps) \
            if plan.zero > 0 or plan.offload.optimizer else None
        if self.engine is not None:
            self.dp, self.optimizer = self.engine, None
        else:
            self.dp = DataParallel(self._reduction_groups(), bucket_mb=plan.bucket_mb,
                                   overlap=plan.overlap_grad_reduce)
            full_dims = {self.named[name]: len(shape) for tp in self.tps for name, shape in tp.full_shapes.items()
                         if name in self.named}
            self.optimizer = build_optimizer(torch.nn.ModuleList(chunks), cfg.optim, cfg.train.lr, full_dims)
        dataset = open_dataset(cfg.data, vocab_size=spec.vocab_size)
        self.train_data = dataset.split("train")
        self.sampler = BatchSampler(len(self.train_data), cfg.train.seq_len, cfg.train.global_batch_size,
                                    cfg.train.seed)
        self.shard = grid.axis("dp").coord * plan.tp_depth + grid.axis("tp_depth").coord
        self.autocast = _autocast(cfg.train.dtype, device)
        self._memory_tracked = False

    def _reduction_groups(self) -> list[tuple[list[torch.nn.Parameter], Any, int]]:
        """Parameters grouped by the grid axes their gradients are summed over."""
        by_axes: dict[tuple[str, ...], list[torch.nn.Parameter]] = {}
        for name, p in self.named.items():
            tp = self.tp_of.get(name)
            axes = tp.grad_axes[name] if tp else ("dp", "cp")
            by_axes.setdefault(tuple(axes), []).append(p)
        return [(params, self.grid.group(*axes).group, self.grid.group(*axes).size)
                for axes, params in by_axes.items()]

    def _pieces(self, name: str) -> int:
        """How many distinct pieces of parameter `name` the tensor-parallel group holds."""
        tp = self.tp_of.get(name)
        if tp is None or name not in tp.splits:
            return 1
        n = 1
        for axis in tp.splits[name]:
            n *= self.grid.axis(axis).size if axis else 1
        if tp.shards[name].flat is not None:
            n *= self.grid.axis("tp_depth").size
        return n

    def _wrap(self, name: str, local: torch.Tensor) -> Any:
        tp = self.tp_of.get(name)
        return tp.to_checkpoint(name, local) if tp else local

    # ---- one optimizer step ----
    def step(self, step: int) -> dict[str, float]:
        cfg, plan = self.cfg, self.cfg.plan
        seq = cfg.train.seq_len
        global_tokens = cfg.train.global_batch_size * seq
        lr = lr_at(step, cfg.train.lr, cfg.optim, cfg.train.steps)
        local = self.sampler.local_batch(self.train_data, step, self.shard, plan.data_shards)  # [G/shards, S+1]
        micro = local.split(plan.micro_batch_size)  # m x [mbs, S+1]
        self.dp.zero_grad()
        # [mbs, S/cp] inputs and targets, global positions [S/cp], per microbatch
        batches = [self.cp.shard(mb.to(self.device, non_blocking=True)) for mb in micro]
        loss_sum = self.pipe.step(batches, self.loss_fn, global_tokens, self.dp, self.autocast,
                                  track_memory=not self._memory_tracked)
        self._memory_tracked = True  # the first step measures activations (plan.json); the rest skip the hooks
        self.dp.finish()
        pp_group = _group_or_none(self.grid.axis("pp"))
        if self.engine is not None:
            norm = self.engine.grad_norm(pp_group)
            self.engine.clip(norm, cfg.optim.grad_clip)
            self.engine.step(lr)
        else:
            norm = global_grad_norm(self.named, self.norm_weights,
                                    _group_or_none(self.grid.group("tp_col", "tp_row", "tp_depth")), pp_group)
            clip_(list(self.named.values()), norm, cfg.optim.grad_clip)
            set_lr(self.optimizer, lr)
            self.optimizer.step()
        for group in (self.grid.axis("pp"), self.data_group):  # the last stage holds the loss
            if group.size > 1:
                dist.all_reduce(loss_sum, group=group.group)
        return {"loss": (loss_sum / global_tokens).item(), "lr": lr, "grad_norm": norm.item()}

    # ---- checkpoints ----
    def measured_memory(self) -> dict[str, int]:
        """Bytes per rank of model states (by role) and the last step's peak saved activations."""
        if self.engine is not None:
            roles = self.engine.state_tensors()
        else:
            roles = memory.data_parallel_roles(torch.nn.ModuleList(self.pipe.chunks.values()), self.dp, self.optimizer)
        return memory.measured(roles, self.pipe.last_memory.peak_device_bytes)

    def _states(self) -> tuple[dict[str, Any], dict[str, Any]]:
        if self.engine is not None:
            return self.engine.checkpoint_state()
        model_state = {name: self._wrap(name, p.data) for name, p in self.named.items()}
        return model_state, ckpt.optimizer_state(self.named, self.optimizer, self._wrap)

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
        if self.engine is not None:
            self.engine.after_load()
        return int(meta["step"])


def run(cfg: RunConfig, grid: Grid, device: torch.device, preempt: Any = None,
        plan_info: Optional[dict[str, Any]] = None) -> TrainResult:
    """Train `cfg.train.steps` steps (continuing from a checkpoint if one is found)."""
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
            if step == start + 1 and rank0:
                _record_memory(cfg.run_dir / "plan.json", info, trainer.measured_memory())
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


def _record_memory(path: Path, info: dict[str, Any], measured: dict[str, int]) -> None:
    """plan.json: `memory.measured` (rank 0, after the first step) beside `memory.predicted`."""
    predicted = (info.get("estimate") or {}).get("memory", {})
    info["memory"] = {"measured": measured, "predicted": predicted}
    write_json_atomic(path, info)


def _cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum of token cross-entropies: logits [B, S, V], targets [B, S]."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum")


def _group_or_none(axis: Any) -> Any:
    return axis.group if axis.size > 1 else None


def _autocast(dtype: str, device: torch.device) -> Any:
    if dtype == "fp32" or (dtype == "auto" and device.type != "cuda"):
        return nullcontext()
    if dtype in ("auto", "bf16"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    raise PlanError(f"train.dtype={dtype!r} must be auto, fp32 or bf16")
