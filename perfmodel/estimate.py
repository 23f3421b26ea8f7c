"""Predict one training step of a plan: compute, exposed communication, pipeline bubble,
optimizer, memory per rank, step time, tokens/s and MFU, with a breakdown.

The step is m microbatches through the bottleneck pipeline stage (the last: it also runs the
head), stretched by the schedule's bubble, then the data-parallel / ZeRO gradient exchange that
the backward did not hide, then the optimizer step. Per microbatch the stage computes
forward + backward (+ recomputation) of its blocks and waits for whatever tensor, context and
pipeline communication is not overlapped (docs/architecture.md, Formulas for every volume).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from perfmodel import comm, flops, pipeline
from perfmodel.flops import mfu, n_params
from perfmodel.memory import (GRAD_BYTES, MASTER_BYTES, Memory, memory, optimizer_bytes_per_param, reduce_bytes,
                              stage_activation_bytes, stage_params)
from perfmodel.specs import Cluster, ModelSpec, Plan
from perfmodel.split import stage_layers


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
        }


DP_MIN_BUCKETS, DP_EDGE_MB = 4, 1.0  # the data-parallel bucket layout; parallel/data.py uses these


def _exposed(cost: float, window: float, overlap: bool, c: Cluster) -> float:
    """What of `cost` is left after overlapping it with `window` seconds of compute. Nothing is
    hidden when ranks share processors (Cluster.compute_units): there is no idle hardware to
    overlap on, the communication threads (copies, reductions, polling) take the cores compute
    needs, and a collective waits for peers that are descheduled."""
    return max(cost - window, 0.0) if overlap and c.ranks_per_unit <= 1 else cost


@dataclass(frozen=True)
class MicrobatchCosts:
    """Seconds one microbatch spends on the bottleneck stage, by component."""

    compute: float
    recompute: float
    tensor: float
    context: float
    backward: float  # backward compute, the window that hides the gradient reduction

    @property
    def total(self) -> float:
        return self.compute + self.recompute + self.tensor + self.context


@dataclass(frozen=True)
class BlockCompute:
    """Forward seconds of one microbatch on one rank: a Block's GEMMs and attention core, the head."""

    gemm: float
    attn: float
    head: float


def block_compute(m: ModelSpec, plan: Plan, c: Cluster, seq: int) -> BlockCompute:
    """A GEMM runs at peak_flops x compute_efficiency, slowed when its smallest dimension is
    near gemm_half_dim; the whole Block (norms, RoPE, softmax, elementwise work, autograd) is
    priced at that rate: compute_efficiency is the fraction of peak a real Block reaches
    (calibrated on a Block for local-cpu, axon/calibrate.py)."""
    x, y = plan.tp_col, plan.tp_row
    tokens = plan.micro_batch_size * seq / plan.cp  # this rank's tokens (batch already split over dp x depth)
    smallest = min(tokens, m.d_model / max(x, y))
    rate = c.peak_flops * c.compute_efficiency * smallest / (smallest + c.gemm_half_dim)
    gemm = tokens * flops.layer_gemm_flops(m) / (x * y) / rate
    attn = tokens * flops.attention_flops(m, seq) / x / rate  # causal attention core (heads split over tp_col only)
    head = tokens * flops.head_flops(m) / (x * y) / rate
    return BlockCompute(gemm, attn, head)


def microbatch_costs(m: ModelSpec, plan: Plan, c: Cluster, seq: int, micro: int) -> MicrobatchCosts:
    e = c.dtype_bytes
    x, y, z = plan.tp_col, plan.tp_row, plan.tp_depth
    tokens = plan.micro_batch_size * seq / plan.cp
    layers = stage_layers(m, plan.pp, seq)
    linears = comm.block_linears(m)
    bc = block_compute(m, plan, c, seq)
    gemm, attn, head = bc.gemm, bc.attn, bc.head
    fwd = gemm + attn
    redo = {"none": 0.0, "selective": attn, "full": fwd + c.block_overhead_s / 3}[plan.recompute]
    redo_layers = layers if plan.recompute_layers < 0 else min(plan.recompute_layers, layers)

    vol = comm.tensor_volumes(m, plan, tokens, e)
    col, row = comm.link_for(plan, ("tp_col",), c), comm.link_for(plan, ("tp_row",), c)
    (fwd_col, bwd_col), (fwd_row, bwd_row) = vol.calls_over_col, vol.calls_over_row
    norms = 2 * comm.all_reduce(vol.norms, y, row)  # two norms; statistics summed over tp_row
    forward_ar = fwd_col * comm.all_reduce(vol.fwd_over_col / fwd_col, x, col) + \
        fwd_row * comm.all_reduce(vol.fwd_over_row / fwd_row, y, row) + norms
    backward_ar = bwd_col * comm.all_reduce(vol.bwd_over_col / bwd_col, x, col) + \
        bwd_row * comm.all_reduce(vol.bwd_over_row / bwd_row, y, row) + norms
    tensor = forward_ar + _exposed(backward_ar, gemm, plan.overlap_tp_input_grad, c)
    if plan.recompute == "full":
        tensor += forward_ar * redo_layers / layers
    if z > 1:
        depth = comm.link_for(plan, ("tp_depth",), c)
        gather = len(linears) * comm.all_gather(vol.weights / len(linears), z, depth)
        scatter = len(linears) * comm.reduce_scatter(vol.weights / len(linears), z, depth)
        if plan.cache_tp_weights:  # gathered once per step, kept for backward and later microbatches
            tensor += gather / micro
        else:
            prefetch = plan.prefetch_tp_weights
            tensor += _exposed(gather, fwd, prefetch, c) + _exposed(gather, 2 * fwd, prefetch, c)
        tensor += _exposed(scatter, 2 * fwd, plan.overlap_tp_depth_reduce, c)

    context = 0.0
    if plan.cp > 1:
        link = comm.link_for(plan, ("cp",), c)
        if plan.cp_mode == "ring":  # K, V blocks hop around the ring, hidden behind the attention blocks;
            # backward: cp - 1 K/V hops and cp hops of the gradient accumulators (parallel/ring_attention.py)
            hop = comm.p2p(comm.cp_ring_bytes(m, plan, tokens, e) / (plan.cp - 1), link)
            context = _exposed((plan.cp - 1) * hop, attn, True, c) + \
                _exposed((2 * plan.cp - 1) * hop, 2 * attn, True, c)
        else:  # Ulysses: all-to-all of q, k, v before and of the output after attention, both passes
            context = 2 * 4 * comm.all_to_all(comm.ulysses_bytes(m, plan, tokens, e) / 4, plan.cp, link)

    compute = layers * (3 * fwd + c.block_overhead_s) + 3 * head
    return MicrobatchCosts(compute=compute, recompute=redo_layers * redo, tensor=layers * tensor,
                       context=layers * context, backward=2 * (layers * fwd + head))


def p2p_send(m: ModelSpec, plan: Plan, c: Cluster, seq: int) -> float:
    """One blocking activation (or gradient) send of a microbatch across a stage boundary."""
    if plan.pp == 1:
        return 0.0
    tokens = plan.micro_batch_size * seq / plan.cp
    return comm.p2p(comm.p2p_bytes(m, plan, tokens, c.dtype_bytes), comm.link_for(plan, ("pp",), c))


def offload_time(fraction: float, unit_bytes: float, c: Cluster, compute: float) -> float:
    """PipeOffload: D2H after F and H2D before B of `fraction` of a microbatch-stage's
    activations, hidden behind the microbatch's compute."""
    return _exposed(2 * fraction * unit_bytes / c.host_bw, compute, True, c) if fraction > 0 else 0.0


def gradient_sync(plan: Plan, c: Cluster, psi: float, mb: MicrobatchCosts, micro: int, units: int) -> float:
    """Exposed seconds of the data-parallel (dp x cp) gradient reduction / ZeRO traffic per step.

    Collectives are counted as the runtime issues them, each paying its latency: plain data
    parallelism all-reduces its buckets (layout below); ZeRO works on `units` flat buffers
    per rank (one per Block and one for the embeddings / head, parallel/zero.py): stage 1
    reduce-scatters each unit's gradient once per step, stage 2 on every microbatch, stage 3
    also gathers each unit before its forward and again before its backward."""
    d = plan.dp * plan.cp
    if d == 1:
        return 0.0
    link = comm.link_for(plan, ("cp", "dp"), c)
    # gradients reduce in parallel.reduce_dtype; ZeRO-3 gathers the compute weights, stages 1-2 the fp32 weights
    grads = psi * reduce_bytes(plan)
    weights = psi * (c.dtype_bytes if plan.zero >= 3 else max(c.dtype_bytes, MASTER_BYTES))
    # parallel/data.py's bucket layout: at most bucket_mb, at least MIN_BUCKETS buckets once the
    # gradients exceed EDGE_MB, and a last (exposed) bucket of at most EDGE_MB
    edge = DP_EDGE_MB * 2**20
    bucket = min(plan.bucket_mb * 2**20, grads / DP_MIN_BUCKETS if grads > edge else grads)
    tail = min(edge, bucket, grads)
    last_bucket = comm.all_reduce(tail, d, link)
    if plan.zero == 0:
        buckets = 1 + math.ceil((grads - tail) / bucket)
        reduce = buckets * comm.all_reduce(grads / buckets, d, link)
        return max(_exposed(reduce, mb.backward, plan.overlap_grad_reduce, c), last_bucket)
    scatter = units * comm.reduce_scatter(grads / units, d, link)
    rounds = micro if plan.zero >= 2 else 1  # stage 2+: every microbatch's gradient, as backward produces it
    hidden = max(_exposed(rounds * scatter, rounds * mb.backward, plan.overlap_grad_reduce, c), last_bucket / 2)
    gather = units * comm.all_gather(weights / units, d, link)
    if plan.zero < 3:  # updated shards gathered after the step
        return hidden + gather
    # ZeRO-3: parameters gathered for forward and again for backward of every microbatch, prefetched
    return hidden + micro * (_exposed(gather, mb.backward / 2, True, c) + _exposed(gather, mb.backward, True, c))


def zero_units(m: ModelSpec, plan: Plan, seq: int) -> int:
    """Flat buffers the ZeRO engine keeps per rank: one per Block of the stage and one root unit."""
    return stage_layers(m, plan.pp, seq) + 1


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
    psi = stage_params(m, plan.pp, seq_len) / plan.tp
    sync = gradient_sync(plan, c, psi, mb, micro, zero_units(m, plan, seq_len))
    opt = optimizer_time(plan, c, psi)
    bubble, step = step_time(micro * (mb.total + p2p + offload), sched.bubble_fraction, sync, opt, c.ranks_per_unit)
    tokens_per_s = global_batch_size * seq_len / step
    mem = memory(m, plan, c, seq_len, sched.peak_activations, sched.head_activations)
    breakdown = {"compute_s": micro * mb.compute, "recompute_s": micro * mb.recompute,
                 "tensor_comm_s": micro * mb.tensor, "context_comm_s": micro * mb.context,
                 "pipeline_p2p_s": micro * p2p, "offload_s": micro * offload, "bubble_s": bubble,
                 "grad_sync_s": sync, "optimizer_s": opt}
    return Estimate(plan, n_params(m), step, tokens_per_s, mfu(m, seq_len, tokens_per_s, plan.world_size, c.peak_flops),
                    mem, breakdown, sched, fits(mem, c))


def fits(mem: Memory, c: Cluster) -> bool:
    """Device bytes within HBM and every device's offloaded bytes within the node's host memory."""
    return mem.total <= c.hbm_bytes and mem.host * c.gpus_per_node <= c.host_bytes


def estimate(m: ModelSpec, plan: Plan, c: Cluster, global_batch_size: int, seq_len: int) -> Estimate:
    """Check `plan` (raising PlanError naming the setting to change) and predict its step."""
    plan.check(m, plan.world_size, global_batch_size, seq_len)
    return evaluate(m, plan, c, global_batch_size, seq_len)
