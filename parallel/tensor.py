"""3D tensor parallelism (AxoNN-style tp_col x tp_row x tp_depth) with sequence parallelism.

    tp = apply(model, spec, plan, grid)      # on the meta model, before materialize
    materialize(model, spec, seed, device, tp.layouts)
    loss_sum = tp.loss_fn(model(tokens), targets)   # vocab-parallel, never gathers the logits
    loss_sum = model.head.fused_loss(model.norm(x), targets)   # 1D: fused, never computes them whole
    tp.weights_changed()                     # after every update of the weights outside autograd

Which module gets which treatment is data: `styles` maps module path patterns (`*` matches one
path component) to a style (GPT_STYLES for axon.model.GPT); a pattern with no module in the
model (a pipeline chunk without the embedding) matches nothing. Each swapped module reports the
`ParamLayout` of its parameters (`TensorParallel.layouts`, by parameter name).

Every Linear weight [out, in] is split over two axes and its piece flattened and split again over
tp_depth. Two orientations alternate so no re-layout happens between layers:
  QKV-type (wq, wk, wv, w_gate, w_up, head): out over tp_col, in over tp_row;
  OUT-type (wo, w_down): out over tp_row, in over tp_col.
Forward: all-gather the weight over depth, local GEMM, all-reduce the output over the in-axis.
Backward: gather again (unless cached), dX all-reduce over the out-axis (async, overlapped with
the dW GEMMs), dW reduce-scatter over depth (deferred to the next op in backward). QKV-type ops
that read the same input (wq, wk, wv; w_gate, w_up) form one group: one autograd node computes
their outputs and sums their local dX before the one reduction, as Megatron's fused QKV and fc1
do (per layer 2 input-gradient reductions, not 5; under SP the sequence gather's reduce-scatter;
parallel/tensor_group.py). Under 1D layouts the head can skip its logits: `TPLinear.fused_loss`
runs the fused cross-entropy (kernels/linear_ce.py) on this rank's vocabulary rows.
Activation layout: the residual stream is [B, S, d/tp_row], replicated over tp_col (split along
the sequence over tp_col with sequence parallelism); tokens are split over tp_depth by the data
loader. Attention heads (q and kv, GQA) are split over tp_col and computed redundantly over
tp_row. Norms reduce their statistics over tp_row. With tp_row = tp_depth = 1 this is Megatron
1D tensor parallelism (column then row), plus Megatron-SP when sequence parallelism is on.
The embedding is split [vocab/tp_col, d/tp_row] (like the head, so tying keeps one layout).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from itertools import groupby
from typing import Callable, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

import kernels
from launch.grid import Grid
from parallel.collectives import Collectives
from parallel.layout import DATA_AXES, TP_AXES, ParamLayout
from parallel.shard import Shard
from parallel.sequence import gather_seq, local_positions, scatter_seq
from parallel.tensor_group import Group
from parallel.tensor_ops import CopyTo, ReduceFrom, SumAcross, reducer
from parallel.tensor_weights import DepthStore, DepthWeight
from perfmodel import rules
from perfmodel.specs import ModelSpec, Plan

COL, ROW, DEPTH = TP_AXES
QKV = (ROW, COL)  # (in-axis, out-axis)
OUT = (COL, ROW)
REPLICATED = DATA_AXES + (DEPTH,)  # gradient sum of a parameter replicated over depth
SPLIT = DATA_AXES  # a depth-sharded weight: the depth reduce-scatter already summed depth

# The tensor-parallel treatment of axon.model.GPT's modules (module path pattern -> style).
GPT_STYLES: dict[str, str] = {
    "tok_emb": "vocab_embedding",
    "pos_emb": "positions",
    "layers.*.attn_norm": "norm",
    "layers.*.attn.wq": "qkv",
    "layers.*.attn.wk": "qkv",
    "layers.*.attn.wv": "qkv",
    "layers.*.attn.wo": "out",
    "layers.*.mlp_norm": "norm",
    "layers.*.mlp.w_gate": "qkv",
    "layers.*.mlp.w_up": "qkv",
    "layers.*.mlp.w_down": "out",
    "norm": "norm",
    "head": "qkv",
}


class _Gathered(torch.autograd.Function):
    """The whole [rows, cols] piece of a depth-sharded weight (for the embedding lookup)."""

    @staticmethod
    def forward(ctx, weight, succ, op: "TPEmbedding"):
        ctx.op, ctx.has_succ = op, succ is not None
        return op.store.weight(op.dw, "fwd").clone()

    @staticmethod
    def backward(ctx, dw):
        op = ctx.op
        dweight = op.store.reduce_grad(op.dw, dw, defer=op.defer)
        return dweight, op.store.take_deferred(op.succ) if ctx.has_succ else None, None


@dataclass
class _Env:
    spec: ModelSpec
    plan: Plan
    comm: Collectives
    store: DepthStore

    def n(self, axis: str) -> int:
        return self.comm.size(axis)

    def span(self, axis: str, full: int) -> slice:
        step = full // self.n(axis)
        c = self.comm.coord(axis)
        return slice(c * step, (c + 1) * step)

    @property
    def sp(self) -> bool:
        return self.plan.sequence_parallel and self.n(COL) > 1


def _meta(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, device="meta"))


class _DepthSharded(nn.Module):
    """A module whose `weight` is the depth-flattened [rows, cols] piece of a full [out, in]."""

    def _init_weight(self, env: _Env, full: tuple[int, int], row_axis: str, col_axis: str) -> None:
        self.env, self.comm, self.store = env, env.comm, env.store
        self.full, self.row_axis, self.col_axis = full, row_axis, col_axis
        self.row_span, self.col_span = env.span(row_axis, full[0]), env.span(col_axis, full[1])
        rows, cols = full[0] // env.n(row_axis), full[1] // env.n(col_axis)
        z = env.n(DEPTH)
        self.flat = env.span(DEPTH, rows * cols) if z > 1 else None
        self.weight = _meta(rows * cols // z) if z > 1 else _meta(rows, cols)
        self.dw: DepthWeight = env.store.add(self, rows, cols)
        self.succ: Optional[DepthWeight] = None  # set by `_chain`
        self.defer = False

    def weight_layout(self) -> ParamLayout:
        return ParamLayout(self.full, Shard(self.row_span, self.col_span, self.flat), (self.row_axis, self.col_axis),
                           depth_flat=self.flat is not None, grad_axes=SPLIT)

    def succ_param(self) -> Optional[nn.Parameter]:
        return self.succ.param if self.succ is not None else None


class TPLinear(_DepthSharded):
    gemm_table = None  # the GEMM layouts of its forward and gradients (kernels/gemm.py attach; None: torch's)

    def __init__(self, linear: nn.Linear, env: _Env, orient: tuple[str, str]):
        super().__init__()
        self.in_axis, self.out_axis = orient
        self._init_weight(env, tuple(linear.weight.shape), self.out_axis, self.in_axis)
        self.bias = _meta(self.row_span.stop - self.row_span.start) if linear.bias is not None else None
        # Under SP the tp_col reductions are the sequence gather/scatter around the op.
        self.scatter = env.sp and self.in_axis == COL
        self.gather = env.sp and self.out_axis == COL  # its input comes sequence-sharded (SP)
        self.reduce_out = not self.scatter
        self.reduce_in_grad = not self.gather
        self.overlap_dx = env.plan.overlap_tp_input_grad
        self.group = Group([self])  # `_share_inputs` puts projections of one input together

    def gemm_shape(self) -> tuple[int, int]:
        """(out_l, in_l) of its local GEMM: the [rows, cols] piece before depth flattening."""
        return self.row_span.stop - self.row_span.start, self.col_span.stop - self.col_span.start

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.group.output(self, x)  # [B, S, out_l]
        if self.scatter:
            y = scatter_seq(y, self.comm, COL)  # [B, S/tp_col, out_l]
        return y + self.bias if self.bias is not None else y

    def fused_loss(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """As the head (1D: tp_row = tp_depth = 1): the summed cross-entropy of x [B, S, in] (under SP
        sequence-sharded [B, S/tp_col, in]) times this rank's vocabulary rows against global targets
        [B, S], fused by token chunks (kernels/linear_ce.py). The input enters as it enters `Group`:
        under SP gathered (backward: reduce-scatter), else replicated (backward: all-reduce of the
        partial input gradient over tp_col)."""
        if self.comm.size(self.in_axis) > 1 or self.flat is not None or self.bias is not None:
            raise ValueError("the fused vocab-parallel head loss takes a head without bias whose input is whole: "
                             "parallel.tp_row = parallel.tp_depth = 1 (perfmodel/memory.py fused_head_loss)")
        x = gather_seq(x, self.comm, COL) if self.gather else CopyTo.apply(x, self.comm, COL)  # [B, S, in]
        return kernels.linear_cross_entropy(x, self.weight, targets, self.env.spec.kernels,
                                            vocab_start=self.row_span.start, vocab_reduce=reducer(self.comm, COL))

    def layouts(self) -> dict[str, ParamLayout]:
        out = {"weight": self.weight_layout()}
        if self.bias is not None:  # replicated over the in-axis (and over tp_col's sequence chunks)
            axes = REPLICATED + ((COL,) if self.scatter else ())
            out["bias"] = ParamLayout((self.full[0],), Shard(rows=self.row_span), (self.out_axis, None), grad_axes=axes)
        return out


class TPEmbedding(_DepthSharded):
    """Vocab-parallel embedding: rows (vocab) over tp_col, columns (d) over tp_row."""

    def __init__(self, emb: nn.Embedding, env: _Env):
        super().__init__()
        self._init_weight(env, tuple(emb.weight.shape), COL, ROW)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        w = self.weight if self.flat is None else _Gathered.apply(self.weight, self.succ_param(), self)
        local = tokens - self.row_span.start  # [B, S]
        inside = (local >= 0) & (local < w.shape[0])
        out = F.embedding(local.clamp(0, w.shape[0] - 1), w) * inside[..., None]  # [B, S, d/tp_row], partial
        if self.env.sp:
            return scatter_seq(out, self.comm, COL)  # [B, S/tp_col, d/tp_row]
        return ReduceFrom.apply(out, self.comm, COL)

    def layouts(self) -> dict[str, ParamLayout]:
        return {"weight": self.weight_layout()}


class TPPositions(nn.Module):
    """Learned positions [max_seq, d/tp_row]; under SP each rank looks up its sequence chunk."""

    def __init__(self, emb: nn.Embedding, env: _Env):
        super().__init__()
        self.env = env
        self.full = tuple(emb.weight.shape)
        self.cols = env.span(ROW, self.full[1])
        self.weight = _meta(self.full[0], self.full[1] // env.n(ROW))

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        if self.env.sp:
            positions = local_positions(positions, self.env.comm, COL)
        return F.embedding(positions, self.weight)  # [S(/tp_col), d/tp_row]

    def layouts(self) -> dict[str, ParamLayout]:
        axes = REPLICATED + ((COL,) if self.env.sp else ())
        return {"weight": ParamLayout(self.full, Shard(cols=self.cols), (None, ROW), grad_axes=axes)}


class TPNorm(nn.Module):
    """RMSNorm / LayerNorm of a [.., d/tp_row] shard with statistics summed over tp_row; under
    SP its output stays sequence-sharded (it always feeds a QKV-type group, which gathers it)."""

    def __init__(self, norm: nn.Module, env: _Env):
        super().__init__()
        self.env, self.d = env, env.spec.d_model
        self.rms = env.spec.norm == "rmsnorm"
        self.eps = env.spec.norm_eps
        self.span = env.span(ROW, self.d)
        self.weight = _meta(self.d // env.n(ROW))
        self.bias = _meta(self.d // env.n(ROW)) if getattr(norm, "bias", None) is not None else None

    def _sum(self, t: torch.Tensor) -> torch.Tensor:
        return SumAcross.apply(t.sum(-1, keepdim=True), self.env.comm, ROW)  # [B, S, 1] over all of d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rms:  # statistics over the whole width: the partial row sums all-reduced over tp_row
            y = kernels.rms_norm(x, self.weight, self.eps, self.env.spec.kernels, width=self.d,
                                 sum_across=lambda t: SumAcross.apply(t, self.env.comm, ROW))  # [B, S, d/tp_row]
        else:
            xf = x.float()  # [B, S, d/tp_row]
            xc = xf - self._sum(xf) / self.d
            y = (xc * torch.rsqrt(self._sum(xc.pow(2)) / self.d + self.eps)).to(x.dtype) * self.weight
        if self.bias is not None:
            y = y + self.bias
        return y  # [B, S or S/tp_col, d/tp_row]

    def layouts(self) -> dict[str, ParamLayout]:
        axes = REPLICATED + ((COL,) if self.env.sp else ())
        one = ParamLayout((self.d,), Shard(rows=self.span), (ROW, None), grad_axes=axes)
        return {"weight": one, "bias": one} if self.bias is not None else {"weight": one}


@dataclass
class TensorParallel:
    """What `apply` did: the layout of every parameter it sharded (by name, for materialize, the
    gradient engines and checkpoints), the vocab-parallel loss, and the byte counters of its
    collectives (`comm.bytes`)."""

    comm: Collectives
    store: DepthStore
    spec: ModelSpec
    layouts: dict[str, ParamLayout] = field(default_factory=dict)
    vocab_start: int = 0

    def loss_fn(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Sum of token cross-entropies of local logits [B, S, V/tp_col] against global targets
        [B, S], by token chunks (kernels/cross_entropy.py); the max and sums all-reduced over tp_col."""
        return kernels.cross_entropy(logits, targets, self.spec.d_model, self.spec.kernels, self.vocab_start,
                                     reducer(self.comm, COL))

    def weights_changed(self) -> None:
        """Call after the parameters change outside autograd (an optimizer step, a checkpoint
        load): the weights gathered over depth (prefetched or cached) are dropped."""
        self.store.weights_changed()


def check(spec: ModelSpec, plan: Plan) -> None:
    """Raise PlanError (naming the setting) when the model does not split over this layout."""
    rules.raise_if(rules.tensor_rules(spec, plan))


def _chain(ops: list[_DepthSharded], plan: Plan) -> None:
    """Each op collects the deferred depth reduce-scatter of the op after it in forward order."""
    if plan.tp_depth == 1 or not plan.overlap_tp_depth_reduce:
        return
    for prev, nxt in zip(ops, ops[1:]):
        prev.succ, nxt.defer = nxt.dw, True


def _share_inputs(swapped: list[tuple[str, str, nn.Module]]) -> None:
    """Consecutive column-parallel ("qkv") projections under one parent module read the same input
    (GPT: wq, wk, wv; w_gate, w_up): each such run becomes one `Group`, so their input gradient
    is reduced once. Consecutive in forward order, so `_chain` links the group's ops in turn."""
    def run_key(entry: tuple[str, str, nn.Module]) -> tuple[str, str]:
        path, style, _ = entry
        return (path.rpartition(".")[0], style) if style == "qkv" else (path, style)

    for (_, style), run in groupby(swapped, run_key):
        ops = [module for _, _, module in run]
        if style == "qkv" and len(ops) > 1:
            group = Group(ops)
            for op in ops:
                op.group = group


Style = Callable[[nn.Module, _Env], nn.Module]
STYLES: dict[str, Style] = {
    "vocab_embedding": TPEmbedding,
    "positions": TPPositions,
    "norm": TPNorm,
    "qkv": lambda module, env: TPLinear(module, env, QKV),
    "out": lambda module, env: TPLinear(module, env, OUT),
}


def matches(pattern: str, path: str) -> bool:
    """Whether module `path` matches `pattern` component by component (`*` is one component)."""
    want, got = pattern.split("."), path.split(".")
    return len(want) == len(got) and all(fnmatchcase(g, w) for w, g in zip(want, got))


def _targets(model: nn.Module, styles: Mapping[str, str]) -> list[tuple[str, str]]:
    """(module path, style) of every module of `model` some pattern of `styles` matches, in
    registration order (for GPT: forward order, which `_chain` relies on)."""
    unknown = set(styles.values()) - set(STYLES)
    if unknown:
        raise ValueError(f"unknown tensor-parallel styles {sorted(unknown)}; known: {sorted(STYLES)}")
    out = []
    for path, _ in model.named_modules():
        hits = [style for pattern, style in styles.items() if matches(pattern, path)]
        if len(hits) > 1:
            raise ValueError(f"module {path} matches several tensor-parallel styles {hits}")
        if hits:
            out.append((path, hits[0]))
    return out


def apply(model: nn.Module, spec: ModelSpec, plan: Plan, grid: Grid, styles: Mapping[str, str] = GPT_STYLES,
          prefetch: Optional[bool] = None) -> TensorParallel:
    """Swap the meta model's modules named by `styles` for their 3D tensor-parallel versions (names
    unchanged). `prefetch`: whether depth gathers are launched one weight ahead (default
    `plan.prefetch_tp_weights`; `parallel.parallelize` turns it off under ZeRO-3)."""
    check(spec, plan)
    comm = Collectives(grid)
    prefetch = plan.prefetch_tp_weights if prefetch is None else prefetch
    env = _Env(spec, plan, comm, DepthStore(comm, prefetch, plan.cache_tp_weights))
    swapped: list[tuple[str, str, nn.Module]] = []
    for path, style in _targets(model, styles):
        parent, _, leaf = path.rpartition(".")
        module = STYLES[style](model.get_submodule(path), env)
        setattr(model.get_submodule(parent), leaf, module)
        swapped.append((path, style, module))
    _chain([m for _, _, m in swapped if isinstance(m, _DepthSharded)], plan)
    _share_inputs(swapped)
    tp = TensorParallel(comm, env.store, spec, vocab_start=env.span(COL, spec.vocab_size).start)
    for path, _, module in swapped:
        tp.layouts.update({f"{path}.{leaf}": layout for leaf, layout in module.layouts().items()})
    return tp
