"""Communication cost: alpha-beta ring collectives, group placement, per-layer volumes.

Formulas are docs/architecture.md, Formulas. A group's bandwidth is the intra-node one when every group
of that kind sits inside one node under the grid's rank order (innermost first: tp_col, tp_row,
tp_depth, cp, dp, pp; the few lines of stride math are repeated here so perfmodel never
imports launch), else the inter-node one (the slowest link of the ring sets its pace).
All sizes are bytes; times are seconds.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from operator import attrgetter

from perfmodel.specs import Cluster, ModelSpec, Plan

INNER_FIRST = ("tp_col", "tp_row", "tp_depth", "cp", "dp", "pp")
_sizes = attrgetter(*INNER_FIRST)  # a plan's degrees in rank order, innermost first


@dataclass(frozen=True)
class Link:
    """Latency (s per hop) and bandwidth (bytes/s per device) a group's ring runs at; `kind`: which
    of the device's links carries it ("intra-node": NVLink / the node's fabric, "inter-node": the
    NIC). Collectives on one kind of link share its bandwidth (perfmodel/block_cost.py `share_link`)."""

    alpha: float
    beta: float
    kind: str = field(default="intra-node", compare=False)


def all_reduce(size: float, group: int, link: Link) -> float:
    """Ring all-reduce of `size` bytes: 2(G-1)alpha + 2(G-1)/G * S/beta."""
    if group <= 1 or size <= 0:
        return 0.0
    return 2 * (group - 1) * link.alpha + 2 * (group - 1) / group * size / link.beta


def all_gather(size: float, group: int, link: Link) -> float:
    """Ring all-gather producing `size` bytes (the full tensor): (G-1)alpha + (G-1)/G * S/beta."""
    if group <= 1 or size <= 0:
        return 0.0
    return (group - 1) * link.alpha + (group - 1) / group * size / link.beta


reduce_scatter = all_gather  # same ring cost, `size` = the full (unscattered) tensor
all_to_all = all_gather  # pairwise exchange: each rank keeps 1/G and sends the rest


def p2p(size: float, link: Link) -> float:
    """One point-to-point message."""
    return link.alpha + size / link.beta if size > 0 else 0.0


def stride_of(plan: Plan, axis: str) -> int:
    """Rank distance between neighbours along `axis` (product of the inner axes' sizes)."""
    return _stride(_sizes(plan), axis)


def _stride(sizes: tuple[int, ...], axis: str) -> int:
    stride = 1
    for inner, size in zip(INNER_FIRST, sizes):
        if inner == axis:
            return stride
        stride *= size
    raise ValueError(f"unknown axis {axis!r}; one of {INNER_FIRST}")


def inside_node(plan: Plan, axes: tuple[str, ...], gpus_per_node: int) -> bool:
    """Whether every group over `axes` (adjacent in the rank order) sits inside one node.

    A group's members occupy an aligned block of stride(innermost) * size(all axes) ranks; it
    stays in a node when that block divides the node."""
    return _inside_node(_sizes(plan), axes, gpus_per_node)


@lru_cache(maxsize=1 << 14)  # the search asks for the same few layouts' groups many times
def _inside_node(sizes: tuple[int, ...], axes: tuple[str, ...], gpus_per_node: int) -> bool:
    inner = min(axes, key=INNER_FIRST.index)
    block = _stride(sizes, inner)
    for axis in axes:
        block *= sizes[INNER_FIRST.index(axis)]
    return block <= gpus_per_node and gpus_per_node % block == 0


def link_for(plan: Plan, axes: tuple[str, ...], cluster: Cluster) -> Link:
    if inside_node(plan, axes, cluster.gpus_per_node):
        return Link(cluster.intra_lat, cluster.intra_bw, "intra-node")
    return Link(cluster.inter_lat, cluster.inter_bw, "inter-node")


def group_size(plan: Plan, axes: tuple[str, ...]) -> int:
    size = 1
    for axis in axes:
        size *= getattr(plan, axis)
    return size


@dataclass(frozen=True)
class Linear:
    """One tensor-parallel Linear of a block: weight k x n; `first` = first of its pair
    (splits n over tp_col and k over tp_row; the second of the pair is transposed); `group`: the
    projections reading the same input, whose input gradients are summed and reduced once."""

    name: str
    k: int
    n: int
    first: bool
    group: str


@lru_cache(maxsize=64)
def block_linears(m: ModelSpec) -> tuple[Linear, ...]:
    """The Linears of a transformer block as parallel/tensor.py runs them: q, k, v and the MLP
    input projections are separate first-of-pair (QKV-type) Linears, grouped by their shared input
    (one backward dX reduction per group, as Megatron's fused QKV and fc1); the attention output
    and MLP down projection are second-of-pair."""
    kv = m.n_kv_heads * m.head_dim
    h = m.d_model
    ins = ("w_gate", "w_up") if m.mlp == "swiglu" else ("w_up",)
    return (Linear("wq", h, h, True, "qkv"), Linear("wk", h, kv, True, "qkv"), Linear("wv", h, kv, True, "qkv"),
            Linear("wo", h, h, False, "wo"), *(Linear(name, h, m.d_ff, True, "mlp_in") for name in ins),
            Linear("w_down", m.d_ff, h, False, "w_down"))


@dataclass(frozen=True)
class TensorVolumes:
    """Per-rank bytes of the 3D-TP collectives of one block for one microbatch (full tensor sizes,
    the argument the ring formulas take) and how many calls carry them. `fwd_*`: blocking forward
    all-reduces; `bwd_*`: the backward dX all-reduces; `weights`: the block's weight shard
    gathered over tp_depth; `norms`: the norms' statistics all-reduced over tp_row."""

    fwd_over_col: float
    fwd_over_row: float
    bwd_over_col: float
    bwd_over_row: float
    weights: float
    calls_over_col: tuple[int, int]  # (forward, backward) collectives over tp_col
    calls_over_row: tuple[int, int]  # (forward, backward) collectives over tp_row
    norms: float = 0.0


def tensor_volumes(m: ModelSpec, plan: Plan, tokens: float, dtype_bytes: int) -> TensorVolumes:
    """AxoNN 3D TP per block (docs/architecture.md, Formulas): with X = tp_col, Y = tp_row, Z = tp_depth and
    `tokens` = this rank's tokens of the microbatch (already / Z, / cp), a first-of-pair Linear
    all-reduces its output (tokens x n/X) over Y, and each group of them reading one input its
    summed dX (tokens x k/Y) over X; the second all-reduces its output (tokens x n/Y) over X and
    its dX (tokens x k/X) over Y. With sequence parallelism each group's dX all-reduce over X
    becomes the all-gather of its sequence-sharded input for the weight gradients and the
    reduce-scatter of its dX (parallel/tensor_group.py `Projections`): together the ring cost of an
    all-reduce."""
    x, y = plan.tp_col, plan.tp_row
    fc = fr = bc = br = w = 0.0
    firsts = seconds = 0
    groups: set[str] = set()
    for lin in block_linears(m):
        if lin.first:
            fr += tokens * lin.n / x
            if lin.group not in groups:
                bc += tokens * lin.k / y
                groups.add(lin.group)
            firsts += 1
        else:
            fc += tokens * lin.n / y
            br += tokens * lin.k / x
            seconds += 1
        w += lin.k * lin.n / (x * y)
    bwd_col_calls = len(groups)
    if plan.sequence_parallel and x > 1:
        bc, bwd_col_calls = 2 * tokens * m.d_model / y, 2
    b = dtype_bytes
    stats = 1 if m.norm == "rmsnorm" else 2  # per token: sum of squares | sum and sum of squares
    return TensorVolumes(fc * b, fr * b, bc * b, br * b, w * b, (seconds, bwd_col_calls), (firsts, seconds),
                         tokens * stats * 4)


def cp_ring_bytes(m: ModelSpec, plan: Plan, tokens: float, dtype_bytes: int) -> float:
    """Ring attention: each of cp-1 steps passes this rank's K and V block (forward)."""
    kv = m.n_kv_heads * m.head_dim / (plan.tp_col * plan.tp_row)
    return (plan.cp - 1) * 2 * tokens * kv * dtype_bytes


def ulysses_bytes(m: ModelSpec, plan: Plan, tokens: float, dtype_bytes: int) -> float:
    """Ulysses: all-to-all of Q, K, V and the attention output (full sizes, per direction)."""
    kv = m.n_kv_heads * m.head_dim
    return tokens * (2 * m.d_model + 2 * kv) / (plan.tp_col * plan.tp_row) * dtype_bytes


def p2p_bytes(m: ModelSpec, plan: Plan, tokens: float, dtype_bytes: int) -> float:
    """Activation sent across one pipeline boundary for one microbatch (sharded over the
    tensor group when sequence parallelism leaves it sharded)."""
    shard = plan.tp_col * plan.tp_row if plan.sequence_parallel else plan.tp_row
    return tokens * m.d_model / shard * dtype_bytes
