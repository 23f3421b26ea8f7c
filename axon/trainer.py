"""The training loop: build the model for this rank, apply parallelism, train, log, checkpoint.

    result = run(cfg, grid, device)      # torch.distributed already initialized

Order (docs/architecture.md, "One training step"): model on the meta device -> parallel mechanisms (by data, from
outside the model) -> materialize this rank's shards -> gradient engine (parallel/grad_engine.py:
data parallelism or ZeRO, each with its AdamW). Every step: microbatches (forward, loss / global
tokens, backward; the engine reduces gradients overlapped with backward) -> global-norm clip ->
AdamW -> metrics -> checkpoint.
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

from axon import checkpoint as ckpt
from axon import hf_load
from axon import goldfish
from axon.config import RunConfig
from axon.data import BatchSampler, open_dataset
from axon.init import materialize
from axon import memory
from axon.metrics import Reporter, Throughput, device_peak_flops, peak_memory_bytes, write_json_atomic, write_run_files
from axon.profiling import StepProfiler
from axon.model import GPT
from axon.optim import lr_at
from launch import dist as launch_dist
from launch.grid import Grid
from parallel import grad_engine, layout, pipeline, recompute
from parallel.loss_mask import mask_targets
from parallel.parallelize import parallelize
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
        # this rank's pipeline chunks on the meta device (in chunk order); each parallelized in
        # one order (parallel/parallelize.py: TP -> CP -> recompute, the recomputed Blocks counted
        # per stage); then only this rank's shards materialize, read off the layouts
        self.pipe = pipeline.apply(spec, plan, grid, lambda ids, emb, head: GPT(spec, ids, emb, head),
                                   cfg.train.seq_len, timeout_s=launch_dist.timeout_for(
                                       "nccl" if device.type == "cuda" else "gloo", cfg.launch.timeout_s))
        chunks = list(self.pipe.chunks.values())
        ks = recompute.per_chunk([len(chunk.layers) for chunk in chunks], plan.recompute_layers)
        self.parts = [parallelize(chunk, spec, plan, grid, k, self.pipe.recompute_meter)
                      for chunk, k in zip(chunks, ks)]
        for chunk, part in zip(chunks, self.parts):
            materialize(chunk, spec, cfg.train.seed, device, part.layouts)
        self.named = self.pipe.named_parameters()  # this rank's parameters by name
        self.layouts = layout.complete(layout.merge(*(part.layouts for part in self.parts)), self.named)
        if hf_load.init_from(cfg.model_init, self.named, self.layouts, spec):  # model.init=hf:<dir>
            self.weights_changed()
        self.cp = self.parts[0].context
        self.loss_fn = self.parts[-1].loss_fn  # used on the last chunk (it holds the head)
        self.data_group = grid.group("dp", "cp", "tp_depth")
        # gradient reduction, norm, clip and AdamW: ZeRO (stages 1-3, optimizer offload) or
        # bucketed data parallelism, by the plan (parallel/grad_engine.py)
        self.engine = grad_engine.build(chunks, self.named, self.layouts, plan, grid, cfg.optim)
        dataset = open_dataset(cfg.data, vocab_size=spec.vocab_size)
        self.train_data = dataset.split("train")
        self.sampler = BatchSampler(len(self.train_data), cfg.train.seq_len, cfg.train.global_batch_size,
                                    cfg.train.seed)
        self.shard = grid.axis("dp").coord * plan.tp_depth + grid.axis("tp_depth").coord
        self.autocast = _autocast(cfg.train.dtype, device)
        self._memory_tracked = False

    def weights_changed(self) -> None:
        """The parameters changed outside autograd (an optimizer step, a checkpoint load): drop
        what the mechanisms derived from their old values (gathered tensor-parallel weights)."""
        for part in self.parts:
            part.weights_changed()

    # ---- one optimizer step ----
    def step(self, step: int) -> dict[str, float]:
        cfg, plan = self.cfg, self.cfg.plan
        seq = cfg.train.seq_len
        global_tokens = cfg.train.global_batch_size * seq
        lr = lr_at(step, cfg.train.lr, cfg.optim, cfg.train.steps)
        local = self.sampler.local_batch(self.train_data, step, self.shard, plan.data_shards)  # [G/shards, S+1]
        micro = local.split(plan.micro_batch_size)  # m x [mbs, S+1]
        self.engine.zero_grad()
        # [mbs, S/cp] inputs and targets, global positions [S/cp], per microbatch
        batches = [self.cp.shard(mb.to(self.device, non_blocking=True)) for mb in micro]
        if cfg.train.goldfish.k:  # dropped targets -> ignored; the loss is over the tokens kept
            batches, global_tokens = self._mask_loss(local, batches)
        loss_sum = self.pipe.step(batches, self.loss_fn, global_tokens, self.engine, self.autocast,
                                  track_memory=not self._memory_tracked)
        self._memory_tracked = True  # the first step measures activations (plan.json); the rest skip the hooks
        self.engine.finish()
        norm = self.engine.grad_norm(_group_or_none(self.grid.axis("pp")))
        self.engine.clip(norm, cfg.optim.grad_clip)
        self.engine.step(lr)
        self.weights_changed()
        for group in (self.grid.axis("pp"), self.data_group):  # the last stage holds the loss
            if group.size > 1:
                dist.all_reduce(loss_sum, group=group.group)
        return {"loss": (loss_sum / global_tokens).item(), "lr": lr, "grad_norm": norm.item()}

    def _mask_loss(self, local: torch.Tensor, batches: list) -> tuple[list, int]:
        """The Goldfish mask of the full samples local [B, S+1], applied to each microbatch's
        (cp-sharded) targets; and the global count of kept targets (one all-reduce over the data
        group, whose ranks hold disjoint tokens; the same number on every rank)."""
        keep = goldfish.keep_mask(local, self.cfg.train.goldfish).split(self.cfg.plan.micro_batch_size)  # m x [mbs, S]
        out, count = [], torch.zeros((), dtype=torch.int64, device=self.device)
        for (inputs, targets, positions), k in zip(batches, keep):
            k = k.to(self.device)[:, positions]  # [mbs, S/cp]
            out.append((inputs, mask_targets(targets, k), positions))
            count += k.sum()
        if self.data_group.size > 1:
            dist.all_reduce(count, group=self.data_group.group)
        return out, max(int(count), 1)

    # ---- checkpoints ----
    def measured_memory(self) -> dict[str, int]:
        """Bytes per rank of model states (by role) and the last step's peak saved activations."""
        return memory.measured(self.engine.state_tensors(), self.pipe.last_memory.peak_device_bytes)

    def save(self, step: int) -> Path:
        model_state, optim_state = self.engine.state_dict()
        meta = ckpt.plan_meta(self.cfg.model, self.cfg.plan, self.sampler.state_dict())
        return ckpt.save(self.cfg.run_dir / "checkpoints", step, model_state, optim_state, meta,
                         self.cfg.checkpoint.keep)

    def maybe_resume(self) -> int:
        path = ckpt.resolve(self.cfg.checkpoint.resume, self.cfg.run_dir / "checkpoints")
        if path is None:
            return 0
        meta = ckpt.read_meta(path)
        ckpt.check_compatible(meta, self.cfg.model, path)
        if meta.get("sampler") is not None:  # a checkpoint from `axon convert` has no data position
            self.sampler.load_state_dict(meta["sampler"])
        model_state, optim_state = self.engine.state_dict()
        ckpt.load(path, model_state, optim_state)
        self.engine.after_load()
        self.weights_changed()
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
                            cfg.run_name, tensorboard=cfg.tensorboard)
    result = TrainResult(start_step=start)
    world = dist.get_world_size()
    tokens = cfg.train.global_batch_size * cfg.train.seq_len
    every = cfg.checkpoint.every
    step = start
    # MFU against the peak a rank can reach (on CPU: the machine's, shared by the ranks on it)
    peak = device_peak_flops(cfg.cluster, min(world, cfg.cluster.gpus_per_node))
    meter, profiler = Throughput(), StepProfiler(cfg.profile, cfg.run_dir, dist.get_rank())
    try:
        while step < cfg.train.steps:
            profiler.before(step + 1)
            t0 = time.perf_counter()
            out = trainer.step(step)
            step += 1
            dt = time.perf_counter() - t0
            profiler.after(step)
            meter.add(tokens, dt)
            result.losses.append(out["loss"])
            result.steps.append(step)
            if step == start + 1 and rank0:
                _record_memory(cfg.run_dir / "plan.json", info, trainer.measured_memory())
            if reporter is not None and (step % cfg.train.log_every == 0 or step == cfg.train.steps):
                tps = tokens / dt
                reporter.log({"step": step, **out, "tokens_per_s": tps, "step_time_s": dt,
                              "mfu": mfu(cfg.model, cfg.train.seq_len, tps, world, peak),
                              "peak_mem_bytes": peak_memory_bytes(device), **meter.figures(world)})
            if preempt is not None and preempt.requested():
                result.final_checkpoint = trainer.save(step)
                result.preempted = True
                break
            if every > 0 and step % every == 0 and step < cfg.train.steps:
                trainer.save(step)
        if not result.preempted and cfg.checkpoint.at_end and step > start:
            result.final_checkpoint = trainer.save(step)
    finally:
        profiler.close()
        trainer.engine.remove()
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


def _group_or_none(axis: Any) -> Any:
    return axis.group if axis.size > 1 else None


def _autocast(dtype: str, device: torch.device) -> Any:
    if dtype == "fp32" or (dtype == "auto" and device.type != "cuda"):
        return nullcontext()
    if dtype in ("auto", "bf16"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    raise PlanError(f"train.dtype={dtype!r} must be auto, fp32 or bf16")
