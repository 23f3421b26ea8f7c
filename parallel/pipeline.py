"""Pipeline parallelism: the model cut into chunks, this rank's chunks built, schedules run.

    pipe = apply(spec, plan, grid, build_chunk, seq_len)    # chunks on the meta device
    for chunk in pipe.chunks.values(): materialize(chunk, spec, seed, device)
    loss_sum = pipe.step(microbatches, loss_fn, global_tokens, engine)   # one optimizer step
    loss_sum = pipe.forward(microbatches, loss_fn)                        # forward only (validation)

`build_chunk(layer_ids, has_embedding, has_head) -> nn.Module` comes from the trainer (parallel/
does not import the model); a chunk exposes `embed(tokens, positions)`, `blocks(x, positions)` and
`logits(x)` and names its parameters by global layer index, so names do not depend on the split.

The model is cut into pp * chunks-per-rank chunks of consecutive layers (chunk c on rank
`schedules.placement(...)[c]`), balanced by cost: forward FLOPs per token of each layer, of the
output head (2 h V) and of the embedding (its dense gradient, V h per microbatch, spread over the
microbatch's tokens), in perfmodel/split.py; the layer count need not divide by the chunks (each
holds at least one layer), and an explicit `layout` (layers per chunk) may be given. "No pipeline"
is the schedule `none` (one chunk, F B per microbatch), so the trainer calls `step` for every run.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from launch.grid import Grid
from perfmodel import rules, schedules
from perfmodel.split import split_layers  # the one split, shared with the performance model
from parallel.activation_offload import ActivationStore, MemoryStats
from parallel.executor import Executor, Microbatch, WeightGradStash, defer_weight_grads
from parallel.grad_engine import GradEngine
from parallel.head_loss import HeadLoss
from parallel.p2p import P2P
from parallel.precision import FP32, Precision
from parallel.recompute import RecomputeMeter
from perfmodel.specs import ModelSpec, Plan

BuildChunk = Callable[[range, bool, bool], nn.Module]


class Pipeline:
    """This rank's chunks and the schedule that runs them."""

    def __init__(self, spec: ModelSpec, plan: Plan, grid: Grid, chunks: dict[int, nn.Module],
                 layers: list[range], timeout_s: float):
        self.spec, self.plan, self.grid = spec, plan, grid
        self.schedule = plan.schedule
        self.chunks = chunks  # chunk index -> module (meta until the trainer materializes it)
        self.layers = layers  # layer range of every chunk (all ranks)
        self.n_chunks = len(layers)
        self.timeout_s = timeout_s
        self._actions: dict[int, list[schedules.Action]] = {}
        self._executor: Executor | None = None
        self.last_memory = MemoryStats()
        self.recompute_meter = RecomputeMeter()  # pass to recompute.apply: full recomputation's reruns

    def named_parameters(self) -> dict[str, nn.Parameter]:
        """This rank's parameters by their layout-independent names."""
        return {name: p for chunk in self.chunks.values() for name, p in chunk.named_parameters()}

    def actions(self, microbatches: int) -> list[schedules.Action]:
        if microbatches not in self._actions:
            plan = self.plan
            lists = schedules.build(self.schedule, plan.pp, microbatches, _virtual(plan), plan.offload.activations)
            self._actions[microbatches] = lists[self.grid.axis("pp").coord]
        return self._actions[microbatches]

    def _build_executor(self, mb: Microbatch, precision: Precision) -> Executor:
        inputs = mb[0]
        device = inputs.device
        params = list(self.named_parameters().values())
        if any(p.is_meta for p in params):
            raise RuntimeError("materialize every chunk in pipe.chunks before the first step")
        plan = self.plan
        seq = inputs.shape[1] // (plan.tp_col if plan.sequence_parallel else 1)
        shape = (inputs.shape[0], seq, self.spec.d_model // plan.tp_row)  # [b, S local, h local]
        dtype = precision.activation_dtype(next((p.dtype for p in params if p.is_floating_point()), torch.float32))
        p2p = P2P(self.grid.axis("pp"), shape, dtype, device, self.timeout_s)
        store = ActivationStore(device, params + precision.compute_tensors())  # weights are not activations
        if self.schedule not in schedules.SPLIT_BACKWARD:
            return Executor(self.chunks, self.n_chunks, p2p, store)
        stash = WeightGradStash()
        b_params = {c: defer_weight_grads(chunk, stash) for c, chunk in self.chunks.items()}
        return Executor(self.chunks, self.n_chunks, p2p, store, stash, b_params)

    def step(self, microbatches: list[Microbatch], loss_fn: HeadLoss,
             global_tokens: int, engine: GradEngine | None, precision: Precision | None = None,
             track_memory: bool = False) -> torch.Tensor:
        """Forward and backward of every microbatch (inputs [b, S], targets [b, S], positions [S] or
        [b, S] for packed rows)
        under the schedule; gradients of (sum of loss_fn) / global_tokens accumulate into the
        parameters, reduced by `engine` (parallel.grad_engine; None: not reduced) during the last
        backward of each chunk.
        Returns the summed loss on the rank holding the last chunk, 0 elsewhere. `precision`
        (parallel/precision.py; default fp32) must be the same object every step.

        `track_memory`: count the saved activations (Python saved-tensor hooks on every saved
        tensor, a few percent of a small model's step; and the Blocks full recomputation reruns,
        through `recompute_meter`) into `last_memory`; steps whose schedule offloads activations
        always run the hooks."""
        precision = precision if precision is not None else FP32
        if self._executor is None:
            self._executor = self._build_executor(microbatches[0], precision)
        ex = self._executor
        ex.store.reset_stats()
        self.recompute_meter.sink = ex.store.note_transient if track_memory else None
        try:
            loss = ex.run(self.actions(len(microbatches)), microbatches, loss_fn, global_tokens, engine, precision,
                          track_memory)
        finally:
            self.recompute_meter.sink = None
        stats = ex.store.reset_stats()
        if track_memory:
            self.last_memory = stats
        return loss

    def forward(self, microbatches: list[Microbatch], loss_fn: HeadLoss,
                precision: Precision | None = None) -> torch.Tensor:
        """The forward of every microbatch under the schedule's forward actions only, without
        gradients (parallel/executor.py `forward_only`): the summed loss on the rank holding the
        last chunk, 0 elsewhere. The microbatches have the training step's shape (the pipeline's
        message buffers are sized by it); `precision` is the training step's object."""
        precision = precision if precision is not None else FP32
        if self._executor is None:
            self._executor = self._build_executor(microbatches[0], precision)
        return self._executor.forward(self.actions(len(microbatches)), microbatches, loss_fn, precision)


def _virtual(plan: Plan) -> int:
    return plan.virtual_stages if plan.schedule == "interleaved" else schedules.chunks_per_rank(plan.schedule)


def check(spec: ModelSpec, plan: Plan, seq_len: int) -> None:
    """Raise PlanError (naming the setting) when the schedule cannot run this model: the rules of
    perfmodel/rules.py the pipeline relies on (the microbatch count is checked when the step's
    schedule is built)."""
    tied = [v for v in rules.split_rules(spec, plan, seq_len) if v.knob == "model.tied_embeddings"]
    rules.raise_if(rules.setting_rules(plan) + rules.schedule_rules(plan, None) + tied
                   + rules.chunk_rules(spec, plan))


def apply(spec: ModelSpec, plan: Plan, grid: Grid, build_chunk: BuildChunk, seq_len: int,
          layout: Sequence[int] | None = None, timeout_s: float = 300.0) -> Pipeline:
    """Split the model for `plan.pp` / `plan.schedule` and build this rank's chunks (meta device)."""
    check(spec, plan, seq_len)
    place = schedules.placement(plan.schedule, plan.pp, _virtual(plan))
    layers = split_layers(spec, len(place), seq_len, plan.micro_batch_size, layout)
    last = len(place) - 1
    me = grid.axis("pp").coord
    with torch.device("meta"):
        chunks = {c: build_chunk(layers[c], c == 0, c == last) for c in range(len(place)) if place[c] == me}
    return Pipeline(spec, plan, grid, chunks, layers, timeout_s)
