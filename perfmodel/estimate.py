"""Predict one training step of a plan: compute, exposed communication, pipeline bubble,
optimizer, memory per rank, step time, tokens/s and MFU, with a breakdown.

The step is m microbatches through the bottleneck pipeline rank, stretched by the schedule's
bubble, then the data-parallel / ZeRO gradient exchange that the backward did not hide, then the
optimizer step. The ranks are loaded as the runtime places the chunks (perfmodel/split.py
`rank_loads`: several chunks per rank under interleaved and V schedules, the embedding with the
first chunk, the head with the last); the bottleneck is the one with the most work, and the
gradient exchange and optimizer price the rank with the most parameters. Per microbatch the rank
computes forward + backward (+ recomputation) of its Blocks (and the head, when it holds it) and
waits for whatever tensor, context and pipeline communication is not overlapped
(docs/architecture.md, Formulas for every volume). GEMMs run at the cluster's efficiency for its
software stack (`Cluster.efficiency`, perfmodel/specs.py).
Overlap is earned: a collective hides only behind the compute it overlaps, and the collectives
overlapped with one pass on one link share its bandwidth (`share_link`); `Estimate.overlap` says
what is hidden on which link.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from perfmodel import comm, pipeline
from perfmodel.block_cost import BlockCosts, block_compute, block_costs, exposed
from perfmodel.flops import mfu, n_params
from perfmodel.memory import (GRAD_BYTES, MASTER_BYTES, Memory, memory, optimizer_bytes_per_param, rank_params,
                              reduce_bytes, stage_activation_bytes, stage_params)
from perfmodel.specs import Cluster, ModelSpec, Plan
from perfmodel.split import RankLoad, rank_loads


@dataclass(frozen=True)
class Estimate:
    plan: Plan
    n_params: int
    step_time_s: float
    tokens_per_s: float
    mfu: float
    memory: Memory
    breakdown: dict[str, float]  # seconds per step by component; they sum to step_time_s
    pipeline: pipeline.ScheduleCost
    fits: bool  # device memory <= cluster.hbm_bytes and offloaded bytes fit the host
    # link kind -> {axis: seconds per step of its collectives hidden behind compute on that link,
    # "compute": the compute they hide behind}; what is not hidden is in the breakdown's comm parts
    overlap: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "plan": self.plan.to_dict(),
            "n_params": self.n_params,
            "step_time_s": self.step_time_s,
            "tokens_per_s": self.tokens_per_s,
            "mfu": self.mfu,
            "memory": self.memory.to_dict(),
            "breakdown": dict(self.breakdown),
            "pipeline": {"bubble_fraction": self.pipeline.bubble_fraction,
                         "peak_activations": self.pipeline.peak_activations, "source": self.pipeline.source},
            "fits": self.fits,
            "overlap": {kind: dict(parts) for kind, parts in self.overlap.items()},
        }


DP_MIN_BUCKETS, DP_EDGE_MB = 4, 1.0  # the data-parallel bucket layout; parallel/data.py uses these


@dataclass(frozen=True)
class MicrobatchCosts:
    """Seconds one microbatch spends on the bottleneck pipeline rank, by component."""

    compute: float
    recompute: float
    tensor: float
    context: float
    backward: float  # backward compute, the window that hides the gradient reduction
    layers: int = 0  # the rank's Blocks (over all its chunks)
    block: BlockCosts | None = None  # one Block's costs (with the collectives hidden per link); None: no Blocks
    head: bool = True  # the rank holds the head (the last chunk)

    @property
    def total(self) -> float:
        return self.compute + self.recompute + self.tensor + self.context

    def busy(self, kind: str) -> tuple[float, float]:
        """Seconds the `kind` link is busy with the stage's hidden Block collectives in the forward
        and in the backward of this microbatch: what is left of the compute for other traffic."""
        if self.block is None:
            return 0.0, 0.0
        return self.layers * self.block.busy_fwd.get(kind, 0.0), self.layers * self.block.busy_bwd.get(kind, 0.0)


@lru_cache(maxsize=4096)
def busiest_loads(m: ModelSpec, pp: int, seq: int, schedule: str = "1f1b", virtual_stages: int = 1
                  ) -> tuple[RankLoad, ...]:
    """The pipeline ranks that can be the slowest per microbatch, as the runtime places the chunks
    (perfmodel/split.py `rank_loads`): the rank with the most Blocks and, unless that one holds
    the head, the head's rank with the most Blocks (a rank's time grows with both)."""
    loads = rank_loads(m, pp, seq, schedule, virtual_stages)
    most = max(loads, key=lambda load: (load.layers, load.head))
    head = max((load for load in loads if load.head), key=lambda load: load.layers)
    return (most,) if most.head else (most, head)


def least_loads(m: ModelSpec, pp: int) -> tuple[RankLoad, ...]:
    """Loads no chunk placement can undercut, for the search's lower bounds: some rank holds at
    least ceil(L / pp) Blocks, and the head's rank at least one Block and the head."""
    if pp <= 1:
        return (RankLoad(m.n_layers, True, True),)
    return RankLoad(-(-m.n_layers // pp), False, False), RankLoad(1, False, True)


def microbatch_costs(m: ModelSpec, plan: Plan, c: Cluster, seq: int, micro: int,
                     blk: BlockCosts | None = None, loads: tuple[RankLoad, ...] | None = None) -> MicrobatchCosts:
    """The bottleneck pipeline rank's costs of one microbatch: of the ranks that can be the slowest
    under the plan's schedule and chunk placement (`busiest_loads`; `loads` to price others), the
    one with the most work. `blk`: the plan's `block_costs` when known (then the plan's micro-batch
    size and cp_mode, which only they depend on, are not read)."""
    blk = blk or block_costs(m, plan, c, seq)
    loads = loads or busiest_loads(m, plan.pp, seq, plan.schedule, plan.virtual_stages)
    out = rank_costs(loads[0], plan, c, micro, blk)
    for load in loads[1:]:
        other = rank_costs(load, plan, c, micro, blk)
        if other.total > out.total:
            out = other
    return out


def rank_costs(load: RankLoad, plan: Plan, c: Cluster, micro: int, blk: BlockCosts) -> MicrobatchCosts:
    """One microbatch's costs on a pipeline rank holding `load`: its Blocks over all its chunks,
    and the head when it holds the last chunk."""
    layers = load.layers
    gemm, attn = blk.compute.gemm, blk.compute.attn
    head = blk.compute.head if load.head else 0.0
    fwd = gemm + attn
    recompute = plan.recompute
    redo = 0.0 if recompute == "none" else attn if recompute == "selective" else fwd + c.block_overhead_s / 3
    redo_layers = layers if plan.recompute_layers < 0 else min(plan.recompute_layers, layers)
    tensor = blk.tensor + blk.depth + blk.shared  # sharing a link exposes collectives of several axes: counted here
    if recompute == "full" and layers:
        tensor += blk.forward_ar * redo_layers / layers
    if plan.cache_tp_weights:  # depth gathers once per step, kept for backward and later microbatches
        tensor += blk.gather / micro
    compute = _stage_compute(layers, fwd, head, c)
    return MicrobatchCosts(compute=compute, recompute=redo_layers * redo, tensor=layers * tensor,
                           context=layers * blk.context, backward=2 * (layers * fwd + head), layers=layers, block=blk,
                           head=load.head)


def _stage_compute(layers: int, fwd: float, head: float, c: Cluster) -> float:
    """Forward + backward compute of a rank's Blocks and (when it holds it) the head for one microbatch."""
    return layers * (3 * fwd + c.block_overhead_s) + 3 * head


def microbatch_compute(m: ModelSpec, plan: Plan, c: Cluster, seq: int) -> float:
    """A cheap lower bound of `microbatch_costs(...).compute` under any schedule and chunk
    placement (`least_loads`), without the communication."""
    bc = block_compute(m, plan, c, seq)
    return max(_stage_compute(load.layers, bc.gemm + bc.attn, bc.head if load.head else 0.0, c)
               for load in least_loads(m, plan.pp))


def p2p_send(m: ModelSpec, plan: Plan, c: Cluster, seq: int) -> float:
    """One blocking activation (or gradient) send of a microbatch across a stage boundary."""
    if plan.pp == 1:
        return 0.0
    tokens = plan.micro_batch_size * seq / plan.cp
    return comm.p2p(comm.p2p_bytes(m, plan, tokens, c.dtype_bytes), comm.link_for(plan, ("pp",), c))


def offload_time(fraction: float, unit_bytes: float, c: Cluster, compute: float) -> float:
    """PipeOffload: D2H after F and H2D before B of `fraction` of a microbatch-stage's
    activations, hidden behind the microbatch's compute."""
    return exposed(2 * fraction * unit_bytes / c.host_bw, compute, True, c) if fraction > 0 else 0.0


def gradient_sync(plan: Plan, c: Cluster, psi: float, mb: MicrobatchCosts, micro: int, units: int) -> float:
    """Exposed seconds of the data-parallel (dp x cp) gradient reduction / ZeRO traffic per step."""
    return sync_traffic(plan, c, psi, mb, micro, units)[0]


def sync_traffic(plan: Plan, c: Cluster, psi: float, mb: MicrobatchCosts, micro: int, units: int
                 ) -> tuple[float, float, str]:
    """(exposed seconds, seconds of collectives, link kind) of the data-parallel (dp x cp) gradient
    reduction / ZeRO traffic per step.

    Collectives are counted as the runtime issues them, each paying its latency: plain data
    parallelism all-reduces its buckets (layout below); ZeRO works on `units` flat buffers
    per rank (one per Block and one for the embeddings / head, parallel/zero.py): stage 1
    reduce-scatters each unit's gradient once per step, stage 2 on every microbatch, stage 3
    also gathers each unit before its forward and again before its backward. They hide behind
    the pass's compute less what the same link spends on the Blocks' hidden collectives then
    (`MicrobatchCosts.busy`, the contention rule), and ZeRO-3's backward gather and gradient
    reduce-scatter share that window."""
    d = plan.dp * plan.cp
    if d == 1:
        return 0.0, 0.0, ""
    link = comm.link_for(plan, ("cp", "dp"), c)
    busy_f, busy_b = mb.busy(link.kind)
    fwd_window, bwd_window = max(mb.backward / 2 - busy_f, 0.0), max(mb.backward - busy_b, 0.0)
    # gradients reduce in parallel.reduce_dtype; every stage gathers the compute weights (parallel/zero.py)
    grads = psi * reduce_bytes(plan)
    weights = psi * c.dtype_bytes
    # parallel/data.py's bucket layout: at most bucket_mb, at least MIN_BUCKETS buckets once the
    # gradients exceed EDGE_MB, and a last (exposed) bucket of at most EDGE_MB
    edge = DP_EDGE_MB * 2**20
    bucket = min(plan.bucket_mb * 2**20, grads / DP_MIN_BUCKETS if grads > edge else grads)
    tail = min(edge, bucket, grads)
    last_bucket = comm.all_reduce(tail, d, link)
    if plan.zero == 0:
        buckets = 1 + math.ceil((grads - tail) / bucket)
        reduce = buckets * comm.all_reduce(grads / buckets, d, link)
        return max(exposed(reduce, bwd_window, plan.overlap_grad_reduce, c), last_bucket), reduce, link.kind
    scatter = units * comm.reduce_scatter(grads / units, d, link)
    rounds = micro if plan.zero >= 2 else 1  # stage 2+: every microbatch's gradient, as backward produces it
    gather = units * comm.all_gather(weights / units, d, link)
    if plan.zero < 3:  # updated shards gathered after the step
        hidden = max(exposed(rounds * scatter, rounds * bwd_window, plan.overlap_grad_reduce, c), last_bucket / 2)
        return hidden + gather, rounds * scatter + gather, link.kind
    # ZeRO-3: parameters gathered for forward and again for backward of every microbatch, prefetched;
    # the backward's gather shares the link with the gradient's reduce-scatter
    forward = micro * exposed(gather, fwd_window, True, c)
    if plan.overlap_grad_reduce:
        backward = max(exposed(micro * (scatter + gather), micro * bwd_window, True, c), last_bucket / 2)
    else:
        backward = micro * (scatter + exposed(gather, bwd_window, True, c))
    return forward + backward, micro * (scatter + 2 * gather), link.kind


def zero_units(m: ModelSpec, plan: Plan, seq: int) -> int:
    """Flat buffers the ZeRO engine keeps per rank: one per Block of the rank with the most
    parameters (the one `stage_params` prices) and one root unit."""
    return rank_units(m, plan.pp, seq, plan.schedule, plan.virtual_stages)


@lru_cache(maxsize=4096)
def rank_units(m: ModelSpec, pp: int, seq: int, schedule: str, virtual_stages: int) -> int:
    loads = rank_loads(m, pp, seq, schedule, virtual_stages)
    return max(loads, key=lambda load: rank_params(m, load)).layers + 1


def optimizer_time(plan: Plan, c: Cluster, psi: float) -> float:
    """Adam over this rank's shard: memory-bound on the device (read the fp32 gradient, read and
    write the fp32 weights and m, v, write the compute copy in mixed precision), or on the host
    when offloaded (gradients down, compute weights up, and the host update at host_bw)."""
    shard = psi / (plan.dp * plan.cp if plan.zero >= 1 else 1)
    e, k = c.dtype_bytes, optimizer_bytes_per_param(c.dtype_bytes)
    update = 2 * MASTER_BYTES + 2 * k  # fp32 weights and Adam states, read and written
    if plan.offload.optimizer:
        return shard * (GRAD_BYTES + e + update) / c.host_bw
    return shard * (GRAD_BYTES + update + (e if e < MASTER_BYTES else 0)) / c.mem_bw


def step_time(busy: float, bubble_fraction: float, sync: float, opt: float, ranks_per_unit: float = 1.0
              ) -> tuple[float, float]:
    """(bubble seconds, step seconds): `busy` pipeline work stretched by the bubble, then the
    exposed gradient synchronisation and the optimizer step. When `ranks_per_unit` ranks share a
    processor (Cluster.compute_units), the busy ranks run faster while others idle in the bubble:
    the pipeline takes the longer of its total work (`busy`, at the all-busy rate) and its
    critical path at the rate of a rank running alone ((busy + bubble) / ranks_per_unit)."""
    bubble = busy * bubble_fraction / (1 - bubble_fraction)
    bubble = max((busy + bubble) / ranks_per_unit - busy, 0.0)
    return bubble, busy + bubble + sync + opt


def evaluate(m: ModelSpec, plan: Plan, c: Cluster, global_batch_size: int, seq_len: int) -> Estimate:
    """`estimate` without the validity checks (the search has already made them)."""
    micro = plan.microbatches(global_batch_size)
    mb = microbatch_costs(m, plan, c, seq_len, micro)
    p2p = 2 * pipeline.p2p_per_microbatch(plan.schedule, plan.virtual_stages) * p2p_send(m, plan, c, seq_len)
    unit = stage_activation_bytes(m, plan, seq_len, c.dtype_bytes)
    offload = offload_time(plan.offload.activations if plan.pp > 1 else 0.0, unit, c, mb.compute)
    sched = pipeline.schedule_cost(plan.schedule, plan.pp, micro, plan.virtual_stages)
    psi = stage_params(m, plan.pp, seq_len, plan.schedule, plan.virtual_stages) / plan.tp
    sync, sync_traffic_s, sync_link = sync_traffic(plan, c, psi, mb, micro, zero_units(m, plan, seq_len))
    opt = optimizer_time(plan, c, psi)
    bubble, step = step_time(micro * (mb.total + p2p + offload), sched.bubble_fraction, sync, opt, c.ranks_per_unit)
    tokens_per_s = global_batch_size * seq_len / step
    mem = memory(m, plan, c, seq_len, micro)
    breakdown = {"compute_s": micro * mb.compute, "recompute_s": micro * mb.recompute,
                 "tensor_comm_s": micro * mb.tensor, "context_comm_s": micro * mb.context,
                 "pipeline_p2p_s": micro * p2p, "offload_s": micro * offload, "bubble_s": bubble,
                 "grad_sync_s": sync, "optimizer_s": opt}
    overlap: dict[str, dict[str, float]] = {}
    for hidden in (mb.block.hidden_fwd, mb.block.hidden_bwd) if mb.block else ():
        for (kind, axis), seconds in hidden.items():
            overlap.setdefault(kind, {})[axis] = overlap.get(kind, {}).get(axis, 0.0) + micro * mb.layers * seconds
    if sync_traffic_s > sync:
        overlap.setdefault(sync_link, {})["dp"] = sync_traffic_s - sync
    for parts in overlap.values():
        parts["compute"] = micro * 1.5 * mb.backward  # forward and backward
    return Estimate(plan, n_params(m), step, tokens_per_s, mfu(m, seq_len, tokens_per_s, plan.world_size, c.peak_flops),
                    mem, breakdown, sched, fits(mem, c), overlap)


def fits(mem: Memory, c: Cluster) -> bool:
    """Device bytes within HBM and every device's offloaded bytes within the node's host memory."""
    return mem.total <= c.hbm_bytes and mem.host * c.gpus_per_node <= c.host_bytes


def estimate(m: ModelSpec, plan: Plan, c: Cluster, global_batch_size: int, seq_len: int) -> Estimate:
    """Check `plan` (raising PlanError naming the setting to change) and predict its step."""
    plan.check(m, plan.world_size, global_batch_size, seq_len)
    return evaluate(m, plan, c, global_batch_size, seq_len)
