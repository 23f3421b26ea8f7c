"""One transformer Block's costs per microbatch on a rank: the compute rate of its GEMMs and
attention (`block_compute`, at the cluster's software-stack efficiency), and the tensor-parallel,
depth and context-parallel collectives with what of them hides behind that compute, the
collectives overlapped on one link sharing its bandwidth (`share_link`). perfmodel/estimate.py
builds a pipeline rank's microbatch and the step from these (docs/architecture.md, Formulas).
"""
from __future__ import annotations

from dataclasses import dataclass

from perfmodel import comm, flops
from perfmodel.specs import Cluster, ModelSpec, Plan


def exposed(cost: float, window: float, overlap: bool, c: Cluster) -> float:
    """What of `cost` is left after overlapping it with `window` seconds of compute. Nothing is
    hidden when ranks share processors (Cluster.compute_units): there is no idle hardware to
    overlap on, the communication threads (copies, reductions, polling) take the cores compute
    needs, and a collective waits for peers that are descheduled."""
    return max(cost - window, 0.0) if overlap and c.ranks_per_unit <= 1 else cost


@dataclass(frozen=True)
class BlockCompute:
    """Forward seconds of one microbatch on one rank: a Block's GEMMs and attention core, the head."""

    gemm: float
    attn: float
    head: float


def block_compute(m: ModelSpec, plan: Plan, c: Cluster, seq: int) -> BlockCompute:
    """A GEMM runs at peak_flops x the stack's efficiency (`Cluster.efficiency`: compute_efficiency
    on the fused stack, eager_efficiency on the eager one), slowed when its smallest dimension is
    near gemm_half_dim; the whole Block (norms, RoPE, softmax, elementwise work, autograd) is
    priced at that rate: the efficiency is the fraction of peak a real Block reaches (calibrated
    on a Block for local-cpu, axon/calibrate.py; on published runs for the GPU presets,
    configs/cluster/*.yaml). The attention core runs at attention_efficiency x that rate (flash
    attention reaches a smaller fraction of peak than a GEMM); Float8 Linears
    (`Cluster.float8_linears`) run float8_speedup x faster, the attention core and the head in bf16."""
    x, y = plan.tp_col, plan.tp_row
    tokens = plan.micro_batch_size * seq / plan.cp  # this rank's tokens (batch already split over dp x depth)
    smallest = min(tokens, m.d_model / max(x, y))
    rate = c.peak_flops * c.efficiency * smallest / (smallest + c.gemm_half_dim)
    linear_rate = rate * c.float8_speedup if c.float8_linears else rate
    gemm = tokens * flops.layer_gemm_flops(m) / (x * y) / linear_rate
    # causal attention core (heads split over tp_col only), at attention_efficiency x the GEMMs' rate
    attn = tokens * flops.attention_flops(m, seq) / x / (rate * c.attention_efficiency)
    head = tokens * flops.head_flops(m) / (x * y) / rate
    return BlockCompute(gemm, attn, head)


def share_link(hidden: dict[tuple[str, str], float], window: float, c: Cluster) -> float:
    """The contention rule. Collectives overlapped with one pass's compute (`window` seconds) that
    run on one kind of link share its bandwidth: together they keep it busy for the sum of their
    times, so per link at most `window` of that sum is hidden and the rest is exposed.
    `hidden`: seconds each (link kind, axis) would hide on its own; scaled down in place to what
    the shared link hides; returns the seconds exposed by the sharing."""
    exposed = 0.0
    for kind in {k for k, _ in hidden}:
        busy = sum(v for (k, _), v in hidden.items() if k == kind)
        room = window if c.ranks_per_unit <= 1 else 0.0
        if busy > room:
            exposed += busy - room
            for key in [key for key in hidden if key[0] == kind]:
                hidden[key] *= room / busy
    return exposed


def _busy(hidden: dict[tuple[str, str], float]) -> dict[str, float]:
    """Seconds each kind of link is busy with a pass's hidden collectives."""
    out: dict[str, float] = {}
    for (kind, _), v in hidden.items():
        out[kind] = out.get(kind, 0.0) + v
    return out


@dataclass(frozen=True)
class BlockCosts:
    """Seconds one Block of one microbatch spends on a rank, forward and backward, by component:
    what `microbatch_costs` multiplies by the stage's layers. The tensor-parallel terms are kept
    apart where recomputation and the depth-gather cache price them differently."""

    compute: BlockCompute
    tensor: float  # forward all-reduces and the exposed backward ones
    forward_ar: float  # the forward all-reduces (full recomputation replays them)
    gather: float  # one all-gather of the Block's weights over tp_depth (cache_tp_weights: once a step)
    depth: float  # the exposed tp_depth gathers (unless cached) and weight-gradient reduce-scatter
    context: float  # exposed context-parallel traffic
    shared: float  # exposed because overlapped collectives of several axes share one link (`share_link`)
    hidden_fwd: dict[tuple[str, str], float]  # (link kind, axis) -> seconds hidden behind the forward
    hidden_bwd: dict[tuple[str, str], float]  # ... and behind the backward
    busy_fwd: dict[str, float]  # link kind -> seconds busy with them in the forward
    busy_bwd: dict[str, float]  # ... and in the backward


def _context(m: ModelSpec, plan: Plan, c: Cluster, tokens: float, attn: float,
             hidden_fwd: dict[tuple[str, str], float], hidden_bwd: dict[tuple[str, str], float]) -> float:
    """Exposed seconds of one Block's context-parallel traffic (cp > 1); what the ring hides behind
    the attention is added to `hidden_fwd` / `hidden_bwd` by link."""
    e = c.dtype_bytes
    link = comm.link_for(plan, ("cp",), c)
    if plan.cp_mode != "ring":  # Ulysses: all-to-all of q, k, v before and of the output after attention, both passes
        return 2 * 4 * comm.all_to_all(comm.ulysses_bytes(m, plan, tokens, e) / 4, plan.cp, link)
    # K, V blocks hop around the ring, hidden behind the attention blocks; backward: cp - 1 K/V hops
    # and cp hops of the gradient accumulators (parallel/ring_attention.py)
    hop = comm.p2p(comm.cp_ring_bytes(m, plan, tokens, e) / (plan.cp - 1), link)
    ring_f, ring_b = (plan.cp - 1) * hop, (2 * plan.cp - 1) * hop
    exposed_f, exposed_b = exposed(ring_f, attn, True, c), exposed(ring_b, 2 * attn, True, c)
    _add(hidden_fwd, (link.kind, "cp"), ring_f - exposed_f)
    _add(hidden_bwd, (link.kind, "cp"), ring_b - exposed_b)
    return exposed_f + exposed_b


def block_costs(m: ModelSpec, plan: Plan, c: Cluster, seq: int) -> BlockCosts:
    """One Block's costs (BlockCosts). They depend on the tensor and context degrees, sequence
    parallelism, cp_mode, the micro-batch size and the tensor-parallel overlap switches; not on dp,
    pp, ZeRO, the schedule, recomputation or offload, so the search computes them once for the many
    layouts that share them.

    Overlap is earned: each collective hides at most behind the compute it overlaps (the dX
    all-reduce behind the dW GEMM, ring hops behind the attention, depth gathers and the gradient
    reduce-scatter behind the pass), and the collectives a pass overlaps on one link share it
    (`share_link`)."""
    e = c.dtype_bytes
    x, y, z = plan.tp_col, plan.tp_row, plan.tp_depth
    tokens = plan.micro_batch_size * seq / plan.cp
    bc = block_compute(m, plan, c, seq)
    gemm, attn = bc.gemm, bc.attn
    fwd = gemm + attn
    hidden_fwd: dict[tuple[str, str], float] = {}
    hidden_bwd: dict[tuple[str, str], float] = {}

    vol = comm.tensor_volumes(m, plan, tokens, e)
    col, row = comm.link_for(plan, ("tp_col",), c), comm.link_for(plan, ("tp_row",), c)
    (fwd_col, bwd_col), (fwd_row, bwd_row) = vol.calls_over_col, vol.calls_over_row
    norms = 2 * comm.all_reduce(vol.norms, y, row)  # two norms; statistics summed over tp_row
    forward_ar = fwd_col * comm.all_reduce(vol.fwd_over_col / fwd_col, x, col) + \
        fwd_row * comm.all_reduce(vol.fwd_over_row / fwd_row, y, row) + norms
    backward_col = bwd_col * comm.all_reduce(vol.bwd_over_col / bwd_col, x, col)
    backward_ar = backward_col + bwd_row * comm.all_reduce(vol.bwd_over_row / bwd_row, y, row) + norms
    overlap_window = gemm  # the dX all-reduce behind the dW GEMM
    if c.async_tp and plan.sequence_parallel and x > 1:  # each pass's collectives behind that pass's GEMMs
        overlap_window = 2 * gemm
        exposed_f = exposed(forward_ar, gemm, True, c)
        _add(hidden_fwd, (col.kind, "tp"), forward_ar - exposed_f)
        forward_ar = exposed_f
    exposed_dx = exposed(backward_ar, overlap_window, plan.overlap_tp_input_grad, c)
    tensor = forward_ar + exposed_dx
    if backward_ar > exposed_dx:  # the hidden part, on the tp_col and tp_row links in proportion
        _add(hidden_bwd, (col.kind, "tp"), (backward_ar - exposed_dx) * backward_col / backward_ar)
        _add(hidden_bwd, (row.kind, "tp"), (backward_ar - exposed_dx) * (1 - backward_col / backward_ar))
    gather = depth = 0.0
    if z > 1:
        linears = comm.block_linears(m)
        link = comm.link_for(plan, ("tp_depth",), c)
        gather = len(linears) * comm.all_gather(vol.weights / len(linears), z, link)
        scatter = len(linears) * comm.reduce_scatter(vol.weights / len(linears), z, link)
        prefetch, reduce = plan.prefetch_tp_weights and not plan.cache_tp_weights, plan.overlap_tp_depth_reduce
        if not plan.cache_tp_weights:  # gathered before the forward, and again before the backward
            depth = exposed(gather, fwd, prefetch, c)
            _add(hidden_fwd, (link.kind, "tp_depth"), gather - depth)
        # the backward's gather and the weight-gradient reduce-scatter share the depth link
        overlapped = (gather if prefetch else 0.0) + (scatter if reduce else 0.0)
        exposed_b = exposed(overlapped, 2 * fwd, True, c)
        _add(hidden_bwd, (link.kind, "tp_depth"), overlapped - exposed_b)
        depth += exposed_b + (0.0 if prefetch or plan.cache_tp_weights else gather) + (0.0 if reduce else scatter)

    context = _context(m, plan, c, tokens, attn, hidden_fwd, hidden_bwd) if plan.cp > 1 else 0.0
    shared = share_link(hidden_fwd, fwd, c) + share_link(hidden_bwd, 2 * fwd, c)
    return BlockCosts(bc, tensor, forward_ar, gather, depth, context, shared, hidden_fwd, hidden_bwd,
                      _busy(hidden_fwd), _busy(hidden_bwd))


def _add(hidden: dict[tuple[str, str], float], key: tuple[str, str], seconds: float) -> None:
    if seconds > 0:
        hidden[key] = hidden.get(key, 0.0) + seconds
