"""The training loop: build the model for this rank, apply parallelism, train, log, checkpoint.

    result = run(cfg, grid, device)      # torch.distributed already initialized

Order (docs/architecture.md, "One training step"): model on the meta device -> parallel mechanisms (by data, from
outside the model) -> materialize this rank's shards -> gradient engine (parallel/grad_engine.py:
data parallelism or ZeRO, each with its AdamW). Every step: microbatches (forward, loss / global
tokens, backward; the engine reduces gradients overlapped with backward) -> global-norm clip ->
AdamW -> validation loss every train.eval_every steps (forward only, axon/evaluate.py) -> metrics
-> checkpoint.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from axon import checkpoint as ckpt
from axon import evaluate
from axon import hf_load
from axon import goldfish
from axon import sft_data
from axon.config import Goldfish, RunConfig
from axon.data import BatchSampler, open_dataset
from axon.init import materialize
from axon import memory
from axon.metrics import (Reporter, Throughput, device_peak_flops, peak_memory_bytes, truncate_metrics,
                          write_json_atomic, write_run_files)
from axon.nonfinite import NonFiniteGuard
from axon.run_dir import RunLock, establish
from axon.profiling import StepProfiler
from axon.model import GPT
from axon.optim import lr_at
from kernels import gemm_tuning
from launch import dist as launch_dist
from launch.grid import Grid
from parallel import grad_engine, layout, pipeline, precision, recompute
from parallel.loss_mask import kept, mask_targets
from parallel.parallelize import parallelize
from perfmodel import rules
from perfmodel.flops import mfu, n_params

@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)  # one per step run by this call
    steps: list[int] = field(default_factory=list)
    val_losses: dict[int, float] = field(default_factory=dict)  # step -> validation loss (train.eval_every)
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
                                   cfg.train.seq_len, timeout_s=launch_dist.collective_timeout(launch_dist.timeout_for(
                                       "nccl" if device.type == "cuda" else "gloo", cfg.launch.timeout_s)))
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
        packed = sft_data.open_packed(cfg.data, cfg.train.seq_len, spec.vocab_size)  # None: token data
        self.packed = packed is not None
        if packed is not None:  # instruction rows (axon/sft_data.py): loss mask, per-document positions
            rules.raise_if(rules.packed_rules(spec, plan))
            data, sampler = packed, sft_data.PackedSampler
        else:
            data, sampler = open_dataset(cfg.data, vocab_size=spec.vocab_size), BatchSampler
        self.train_data = data.split("train")
        self.sampler = sampler(len(self.train_data), cfg.train.seq_len, cfg.train.global_batch_size, cfg.train.seed)
        if cfg.train.eval_every:  # the held-out windows of the validation loss (axon/evaluate.py)
            self.val_data = data.split("val")
            self.val_sampler = evaluate.val_windows(self.val_data, self.packed, cfg.train.seq_len,
                                                    cfg.train.global_batch_size, cfg.train.eval_batches)
        self.shard = grid.axis("dp").coord * plan.tp_depth + grid.axis("tp_depth").coord
        # train.dtype: bf16 compute weights made once per step from the engine's fp32 masters
        self.precision = precision.build(precision.policy(cfg.train.dtype, device), chunks, self.engine)
        self._memory_tracked = False
        self.guard = NonFiniteGuard(cfg.train.on_nonfinite, cfg.train.max_skips)
        self.mark = _no_mark  # the watchdog's progress mark, set by run()
        self.run_id = ""  # the run owning the run directory's checkpoints, set by run()
        self.gemm_table: Optional[gemm_tuning.GemmTable] = None  # model.gemm_tuning's decisions, set by tune_gemms()

    def tune_gemms(self, rank0: bool) -> None:
        """model.gemm_tuning (kernels/gemm_tuning.py): the layouts of this rank's Linear GEMMs, timed once
        per shape (none a run directory or the device cache already holds), agreed by all ranks,
        written to <run dir>/gemm_tuning.json and the cache, and attached to the chunks' Linears."""
        cfg, plan = self.cfg, self.cfg.plan
        tokens = plan.micro_batch_size * cfg.train.seq_len // plan.cp  # rows of every Linear GEMM
        self.gemm_table = gemm_tuning.for_run(cfg.model.gemm_tuning, cfg.model.gemm_cache, cfg.run_dir, self.device,
                                              self.precision.policy.compute, self.pipe.chunks.values(), tokens, rank0)

    def weights_changed(self) -> None:
        """The parameters changed outside autograd (an optimizer step, a checkpoint load): drop
        what the mechanisms derived from their old values (gathered tensor-parallel weights)."""
        for part in self.parts:
            part.weights_changed()

    # ---- one optimizer step ----
    def step(self, step: int, preempt: Any = None) -> dict[str, float]:
        """One optimizer step; `preempt` (axon/preempt.py), when given, has every rank's stop
        signal settled by the step's agreement (`_agreed`)."""
        cfg, plan = self.cfg, self.cfg.plan
        seq = cfg.train.seq_len
        global_tokens = cfg.train.global_batch_size * seq
        lr = lr_at(step, cfg.train.lr, cfg.optim, cfg.train.steps)
        local = self.sampler.local_batch(self.train_data, step, self.shard, plan.data_shards)  # [G/shards, S+1]
        if self.device.type == "cuda":  # page-locked, so the copies to the device below run asynchronously
            local = local.pin_memory()
        self.mark(step + 1, "data")
        self.engine.zero_grad()
        if self.packed:  # [mbs, S/cp] inputs, targets (prompt, padding ignored), per-sample positions
            batches, global_tokens = sft_data.microbatches(local, self.cp, plan.micro_batch_size, self.device,
                                                           cfg.train.goldfish, self.data_group)
        else:
            micro = local.split(plan.micro_batch_size)  # m x [mbs, S+1]
            # [mbs, S/cp] inputs and targets, global positions [S/cp], per microbatch
            batches = [self.cp.shard(mb.to(self.device, non_blocking=True)) for mb in micro]
            if cfg.train.goldfish.k:  # dropped targets -> ignored; the loss is over the tokens kept
                batches, global_tokens = self._mask_loss(local, batches)
        self.mark(step + 1, "forward-backward")
        loss_sum = self.pipe.step(batches, self.loss_fn, global_tokens, self.engine, self.precision,
                                  track_memory=not self._memory_tracked)
        self._memory_tracked = True  # the first step measures activations (plan.json); the rest skip the hooks
        self.mark(step + 1, "grad-sync")
        self.engine.finish()
        norm = self.engine.grad_norm(_group_or_none(self.grid.axis("pp")))
        loss, grad_norm, finite = self._agreed(loss_sum, global_tokens, norm, preempt)
        out = {"loss": loss, "lr": lr, "grad_norm": grad_norm}
        if not finite and not self.guard.allows(step + 1, loss, grad_norm, self.engine):  # NaN/Inf: stop or skip
            return {**out, "skipped_steps": self.guard.skipped}
        self.mark(step + 1, "optimizer")
        self.engine.clip(norm, cfg.optim.grad_clip)
        self.engine.step(lr)
        self.weights_changed()
        return out

    # ---- validation ----
    def evaluating(self, step: int) -> bool:
        """Whether the validation loss is computed after `step` steps: every train.eval_every and at the end."""
        every = self.cfg.train.eval_every
        return every > 0 and (step % every == 0 or step == self.cfg.train.steps)

    def evaluate(self) -> float:
        """The validation loss (axon/evaluate.py): train.eval_batches global batches of the val
        split, forward only under the step's layout and precision, averaged over the kept targets;
        the same on every rank. Weights, gradients, generators and the data order are untouched."""
        cfg, plan = self.cfg, self.cfg.plan
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        count = torch.zeros((), dtype=torch.float64, device=self.device)  # this rank's kept targets
        with evaluate.kept_rng(self.device):
            for j in range(cfg.train.eval_batches):
                local = self.val_sampler.local_batch(self.val_data, j, self.shard, plan.data_shards)  # [G/shards, S+1]
                if self.packed:  # prompt and padding targets ignored; no Goldfish mask
                    batches, _ = sft_data.microbatches(local, self.cp, plan.micro_batch_size, self.device, Goldfish(),
                                                       self.data_group)
                else:  # m x ([mbs, S/cp] inputs and targets, positions)
                    batches = [self.cp.shard(mb.to(self.device)) for mb in local.split(plan.micro_batch_size)]
                loss_sum += self.pipe.forward(batches, self.loss_fn, self.precision).double()
                count += sum(kept(targets).sum() for _, targets, _ in batches)
        self.engine.after_forward()  # ZeRO-3: free what the forward left gathered
        if self.grid.axis("pp").size > 1:  # the last stage holds the loss
            dist.all_reduce(loss_sum, group=self.grid.axis("pp").group)
        both = torch.stack([loss_sum, count])  # the data group's ranks hold disjoint targets
        if self.data_group.size > 1:
            dist.all_reduce(both, group=self.data_group.group)
        loss, tokens = both.tolist()
        return loss / max(tokens, 1.0)

    def _agreed(self, loss_sum: torch.Tensor, global_tokens: int, norm: torch.Tensor,
                preempt: Any) -> tuple[float, float, bool]:
        """(mean loss, norm, finite everywhere), with `preempt`'s stop signal settled: one world
        all-reduce and one host sync per step. A NaN/Inf on any rank counts for all (a flipped bit
        after the reductions must not split the ranks' decisions). The world's sum of loss_sum /
        copies is the global loss sum: the ranks of a data shard's tensor group hold copies of the
        same loss, pipeline ranks without the loss chunk hold 0, the data group's ranks disjoint
        tokens."""
        copies = dist.get_world_size() // (self.data_group.size * self.grid.axis("pp").size)
        bad = (~(loss_sum.isfinite() & norm.isfinite())).double()  # 0-dim
        votes = torch.tensor(preempt.vote() if preempt is not None else [], dtype=torch.float64, device=self.device)
        agree = torch.cat([torch.stack([loss_sum.double() / copies, bad]), votes])  # [2 + stop signals]
        if dist.get_world_size() > 1:
            dist.all_reduce(agree)
        total, bad_f, *counts, norm_f = torch.cat([agree, norm.double().reshape(1)]).tolist()
        if preempt is not None:
            preempt.settle(counts)
        return total / global_tokens, norm_f, bad_f == 0.0

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
        return memory.measured(self.engine.state_tensors(), self.pipe.last_memory.peak_device_bytes, self.device)

    def save(self, step: int) -> Path:
        model_state, optim_state = self.engine.state_dict()
        meta = ckpt.plan_meta(self.cfg.model, self.cfg.plan, self.sampler.state_dict())
        return ckpt.save(self.cfg.run_dir / "checkpoints", step, model_state, optim_state, meta,
                         self.cfg.checkpoint.keep, self.run_id)

    def maybe_resume(self) -> int:
        root = self.cfg.run_dir / "checkpoints"
        if dist.get_rank() == 0:
            ckpt.recover(root)  # a crash between a same-step replacement's two renames
        dist.barrier()
        path = ckpt.resolve(self.cfg.checkpoint.resume, self.cfg.run_dir / "checkpoints", self.run_id)
        if path is None:
            return 0
        meta = ckpt.read_meta(path)
        ckpt.check_compatible(meta, self.cfg.model, path)
        if meta.get("sampler") is not None:  # a checkpoint from `axon convert` has no data position
            self.sampler.load_state_dict(meta["sampler"])
        model_state, optim_state = self.engine.state_dict()
        ckpt.load(path, model_state, optim_state)
        self.engine.after_load(model_state, optim_state)
        self.weights_changed()
        return int(meta["step"])


def run(cfg: RunConfig, grid: Grid, device: torch.device, preempt: Any = None,
        plan_info: Optional[dict[str, Any]] = None, watchdog: Any = None) -> TrainResult:
    """Train `cfg.train.steps` steps (continuing from a checkpoint if one is found). `watchdog`
    (launch/watchdog.py) gets a `mark(step, phase)` at every phase boundary."""
    mark = watchdog.mark if watchdog is not None else _no_mark
    mark(0, "build")
    trainer = Trainer(cfg, grid, device)
    trainer.mark = mark
    rank0 = dist.get_rank() == 0
    lock = RunLock.acquire(cfg.run_dir) if rank0 else None  # one job per run directory
    try:
        mark(0, "resume")
        trainer.run_id = _run_id(cfg.run_dir, rank0)
        mark(0, "gemm tuning")
        trainer.tune_gemms(rank0)
        start = trainer.maybe_resume()
        return _train(cfg, trainer, start, rank0, preempt, plan_info, mark)
    finally:
        trainer.engine.remove()
        if lock is not None:
            lock.release()


def _train(cfg: RunConfig, trainer: Trainer, start: int, rank0: bool, preempt: Any,
           plan_info: Optional[dict[str, Any]], mark: Any) -> TrainResult:
    reporter = None
    if rank0:
        info = {"plan": cfg.plan.to_dict(), "world_size": dist.get_world_size(), "n_params": n_params(cfg.model),
                "resumed_from_step": start, "run_id": trainer.run_id, **(plan_info or {})}
        write_run_files(cfg.run_dir, cfg.raw, info)
        truncate_metrics(cfg.run_dir / "metrics.jsonl", start)
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
            t0, c0 = time.perf_counter(), time.process_time()
            out = trainer.step(step, preempt)
            step += 1
            dt, cpu = time.perf_counter() - t0, time.process_time() - c0
            profiler.after(step)
            meter.add(tokens, dt)
            result.losses.append(out["loss"])
            result.steps.append(step)
            if trainer.evaluating(step):
                mark(step, "eval")
                out = {**out, "val_loss": trainer.evaluate()}
                result.val_losses[step] = out["val_loss"]
            mark(step, "metrics")
            if step == start + 1 and rank0:
                _record_memory(cfg.run_dir / "plan.json", info, trainer.measured_memory())
            if reporter is not None and (step % cfg.train.log_every == 0 or step == cfg.train.steps
                                         or "skipped_steps" in out or "val_loss" in out):
                tps = tokens / dt
                reporter.log({"step": step, **out, "tokens_per_s": tps, "step_time_s": dt, "host_cpu_s": cpu,
                              "mfu": mfu(cfg.model, cfg.train.seq_len, tps, world, peak),
                              "peak_mem_bytes": peak_memory_bytes(trainer.device), **meter.figures(world)})
            if preempt is not None and preempt.agreed is not None:  # settled by the step
                mark(step, "checkpoint")
                result.final_checkpoint = trainer.save(step)
                result.preempted = True
                break
            if every > 0 and step % every == 0 and step < cfg.train.steps:
                mark(step, "checkpoint")
                trainer.save(step)
        if not result.preempted and cfg.checkpoint.at_end and step > start:
            mark(step, "checkpoint")
            result.final_checkpoint = trainer.save(step)
    finally:
        profiler.close()
        if reporter is not None:
            reporter.close()
    return result


def _run_id(run_dir: Path, rank0: bool) -> str:
    """The run directory's run id (axon/run_dir.py): rank 0 reads or creates it, all ranks get it."""
    box = [establish(run_dir) if rank0 else None]
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    return str(box[0])


def _no_mark(step: int, phase: str) -> None:
    """The progress mark when no watchdog runs."""


def _record_memory(path: Path, info: dict[str, Any], measured: dict[str, int]) -> None:
    """plan.json: `memory.measured` (rank 0, after the first step) beside `memory.predicted`."""
    predicted = (info.get("estimate") or {}).get("memory", {})
    info["memory"] = {"measured": measured, "predicted": predicted}
    write_json_atomic(path, info)


def _group_or_none(axis: Any) -> Any:
    return axis.group if axis.size > 1 else None
