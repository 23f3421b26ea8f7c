"""3D tensor parallelism (AxoNN-style tp_col x tp_row x tp_depth) with sequence parallelism.

    tp = apply(model, spec, plan, grid)      # on the meta model, before materialize
    materialize(model, spec, seed, device, shards=tp.shards, full_shapes=tp.full_shapes)
    loss_sum = tp.loss_fn(model(tokens), targets)   # vocab-parallel, never gathers the logits

Every Linear weight [out, in] is split over two axes and its piece flattened and split again over
tp_depth. Two orientations alternate so no re-layout happens between layers:
  QKV-type (wq, wk, wv, w_gate, w_up, head): out over tp_col, in over tp_row;
  OUT-type (wo, w_down): out over tp_row, in over tp_col.
Forward: all-gather the weight over depth, local GEMM, all-reduce the output over the in-axis.
Backward: gather again (unless cached), dX all-reduce over the out-axis (async, overlapped with
the dW GEMM), dW reduce-scatter over depth (deferred to the next op in backward).
Activation layout: the residual stream is [B, S, d/tp_row], replicated over tp_col (split along
the sequence over tp_col with sequence parallelism); tokens are split over tp_depth by the data
loader. Attention heads (q and kv, GQA) are split over tp_col and computed redundantly over
tp_row. Norms reduce their statistics over tp_row. With tp_row = tp_depth = 1 this is Megatron
1D tensor parallelism (column then row), plus Megatron-SP when sequence parallelism is on.
The embedding is split [vocab/tp_col, d/tp_row] (like the head, so tying keeps one layout).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from launch.grid import Grid, rank_of
from parallel.collectives import Collectives
from parallel.shard import Shard
from parallel.sequence import gather_seq, local_positions, scatter_seq
from parallel.tensor_ops import ReduceFrom, SumAcross, VocabCrossEntropy
from parallel.tensor_weights import DepthStore, DepthWeight
from perfmodel.specs import ModelSpec, Plan, PlanError

COL, ROW, DEPTH = "tp_col", "tp_row", "tp_depth"
TP_AXES = (COL, ROW, DEPTH)
QKV = (ROW, COL)  # (in-axis, out-axis)
OUT = (COL, ROW)
REPLICATED = ("dp", "cp", DEPTH)  # gradient sum of a parameter replicated over depth
SPLIT = ("dp", "cp")  # a depth-sharded weight: the depth reduce-scatter already summed depth


class _Linear(torch.autograd.Function):
    """y = x W^T for the [rows, cols] piece W of a depth-sharded weight; `succ` is the weight of
    the next op in forward order, whose deferred gradient this op's backward collects."""

    @staticmethod
    def forward(ctx, x, weight, succ, op: "TPLinear"):
        w = op.store.weight(op.dw, "fwd")  # [out_l, in_l]
        y = F.linear(x, w)  # [B, S, out_l] partial over the in-axis
        if op.reduce_out:
            op.comm.all_reduce(y, op.in_axis)
        ctx.save_for_backward(x)
        ctx.op, ctx.has_succ = op, succ is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        op: TPLinear = ctx.op
        w = op.store.weight(op.dw, "bwd").to(dy.dtype)  # gathered again unless cached (autocast: dy's dtype)
        dx = dy @ w  # [B, S, in_l]
        handle = None
        if op.reduce_in_grad:
            handle = op.comm.all_reduce(dx, op.out_axis, async_op=op.overlap_dx)
        dw = dy.reshape(-1, dy.shape[-1]).t() @ x.reshape(-1, x.shape[-1]).to(dy.dtype)  # [out_l, in_l]
        dweight = op.store.reduce_grad(op.dw, dw.to(op.weight.dtype), defer=op.defer)
        dsucc = op.store.take_deferred(op.succ) if ctx.has_succ else None
        if handle is not None:
            handle.wait()
        return dx.to(x.dtype), dweight, dsucc, None


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

    def weight_shard(self) -> tuple:
        return Shard(self.row_span, self.col_span, self.flat), self.full, SPLIT, (self.row_axis, self.col_axis)

    def succ_param(self) -> Optional[nn.Parameter]:
        return self.succ.param if self.succ is not None else None


class TPLinear(_DepthSharded):
    def __init__(self, linear: nn.Linear, env: _Env, orient: tuple[str, str]):
        super().__init__()
        self.in_axis, self.out_axis = orient
        self._init_weight(env, tuple(linear.weight.shape), self.out_axis, self.in_axis)
        self.bias = _meta(self.row_span.stop - self.row_span.start) if linear.bias is not None else None
        # Under SP the tp_col reductions are the sequence gather/scatter around the op.
        self.scatter = env.sp and self.in_axis == COL
        self.reduce_out = not self.scatter
        self.reduce_in_grad = not (env.sp and self.out_axis == COL)
        self.overlap_dx = env.plan.overlap_tp_input_grad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _Linear.apply(x, self.weight, self.succ_param(), self)  # [B, S, out_l]
        if self.scatter:
            y = scatter_seq(y, self.comm, COL)  # [B, S/tp_col, out_l]
        return y + self.bias if self.bias is not None else y

    def param_shards(self) -> dict:
        out = {"weight": self.weight_shard()}
        if self.bias is not None:  # replicated over the in-axis (and over tp_col's sequence chunks)
            axes = REPLICATED + ((COL,) if self.scatter else ())
            out["bias"] = (Shard(rows=self.row_span), (self.full[0],), axes, (self.out_axis, None))
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

    def param_shards(self) -> dict:
        return {"weight": self.weight_shard()}


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

    def param_shards(self) -> dict:
        axes = REPLICATED + ((COL,) if self.env.sp else ())
        return {"weight": (Shard(cols=self.cols), self.full, axes, (None, ROW))}


class TPNorm(nn.Module):
    """RMSNorm / LayerNorm of a [.., d/tp_row] shard with statistics summed over tp_row; under
    SP it then gathers the sequence (it always feeds a QKV-type op)."""

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
        xf = x.float()  # [B, S, d/tp_row]
        if self.rms:
            y = xf * torch.rsqrt(self._sum(xf.pow(2)) / self.d + self.eps)
        else:
            xc = xf - self._sum(xf) / self.d
            y = xc * torch.rsqrt(self._sum(xc.pow(2)) / self.d + self.eps)
        y = y.to(x.dtype) * self.weight
        if self.bias is not None:
            y = y + self.bias
        return gather_seq(y, self.env.comm, COL) if self.env.sp else y

    def param_shards(self) -> dict:
        axes = REPLICATED + ((COL,) if self.env.sp else ())
        out = {"weight": (Shard(rows=self.span), (self.d,), axes, (ROW, None))}
        if self.bias is not None:
            out["bias"] = (Shard(rows=self.span), (self.d,), axes, (ROW, None))
        return out


@dataclass
class TensorParallel:
    """What `apply` did: shards and full shapes for materialize, gradient reduction axes, the
    vocab-parallel loss, and the byte counters of its collectives (`comm.bytes`)."""

    comm: Collectives
    store: DepthStore
    shards: dict[str, Shard] = field(default_factory=dict)
    full_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    grad_axes: dict[str, tuple[str, ...]] = field(default_factory=dict)
    splits: dict[str, tuple[Optional[str], Optional[str]]] = field(default_factory=dict)  # (rows, cols) axis
    vocab_start: int = 0
    _mesh: Any = None

    def mesh(self, device_type: str) -> Any:
        """DeviceMesh (tp_col, tp_row, tp_depth) over the grid's existing groups (no new groups)."""
        if self._mesh is None:
            from torch.distributed.device_mesh import DeviceMesh

            grid = self.comm.grid
            sizes = [grid.plan.tp_col, grid.plan.tp_row, grid.plan.tp_depth]
            ranks = torch.empty(sizes, dtype=torch.int)
            for c, r, z in itertools.product(*map(range, sizes)):
                ranks[c, r, z] = rank_of(grid.plan, dict(grid.coords(), tp_col=c, tp_row=r, tp_depth=z))
            self._mesh = DeviceMesh.from_group([grid.axis(a).group for a in TP_AXES], device_type, mesh=ranks,
                                               mesh_dim_names=TP_AXES)
        return self._mesh

    def to_checkpoint(self, name: str, local: torch.Tensor) -> torch.Tensor:
        """The local piece of `name` (a parameter or a same-shaped optimizer state) as a DTensor of
        the full tensor, sharing `local`'s memory, so torch.distributed.checkpoint reshards it."""
        from torch.distributed.tensor import DTensor, Replicate
        from torch.distributed.tensor import Shard as DShard

        if name not in self.splits:
            return local
        full, (row_axis, col_axis) = self.full_shapes[name], self.splits[name]
        placements = [Replicate()] * 3
        if row_axis is not None:
            placements[TP_AXES.index(row_axis)] = DShard(0)
        if col_axis is not None:
            placements[TP_AXES.index(col_axis)] = DShard(1)
        view = local
        if self.shards[name].flat is not None:  # the depth slice is a row block of the piece (see check)
            placements[2] = DShard(0)
            view = local.view(-1, full[1] // self.comm.size(col_axis))
        stride = torch.empty(full, device="meta").stride()
        return DTensor.from_local(view, self.mesh(local.device.type), placements, run_check=False, shape=torch.Size(full), stride=stride)

    def from_checkpoint(self, name: str, loaded: torch.Tensor) -> torch.Tensor:
        """The local tensor of what `to_checkpoint` returned after a load (same memory)."""
        local = loaded.to_local() if hasattr(loaded, "to_local") else loaded
        return local.reshape(-1) if self.shards.get(name, Shard()).flat is not None else local

    def loss_fn(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Sum of token cross-entropies of local logits [B, S, V/tp_col] against global targets."""
        return VocabCrossEntropy.apply(logits, targets, self.comm, COL, self.vocab_start)


def check(spec: ModelSpec, plan: Plan) -> None:
    """Raise PlanError (naming the setting) when the model does not split over this layout."""
    x, y, z = plan.tp_col, plan.tp_row, plan.tp_depth
    rules = (("model.n_heads", spec.n_heads, x, "parallel.tp_col"),
             ("model.n_kv_heads", spec.n_kv_heads, x, "parallel.tp_col"),
             ("model.d_ff", spec.d_ff, x, "parallel.tp_col"),
             ("model.vocab_size", spec.vocab_size, x, "parallel.tp_col"),
             ("model.d_model", spec.d_model, y * z, "parallel.tp_row * parallel.tp_depth"),
             # depth slices are row blocks of each piece (layout-independent checkpoints)
             ("model.d_model", spec.d_model, x * z, "parallel.tp_col * parallel.tp_depth"),
             ("model.n_kv_heads * head_dim", spec.n_kv_heads * spec.head_dim, x * z,
              "parallel.tp_col * parallel.tp_depth"),
             ("model.d_ff", spec.d_ff, x * z, "parallel.tp_col * parallel.tp_depth"),
             ("model.vocab_size", spec.vocab_size, x * z, "parallel.tp_col * parallel.tp_depth"))
    for name, value, by, knob in rules:
        if value % by:
            raise PlanError(f"{name}={value} is not divisible by {knob} = {by}; change {name} or {knob}")
    if spec.tied_embeddings and plan.tp > 1:
        raise PlanError("model.tied_embeddings=true is not supported with tensor parallelism "
                        "(parallel.tp_col * tp_row * tp_depth > 1); untie the embeddings or use tp = 1")


def _chain(ops: list[_DepthSharded], plan: Plan) -> None:
    """Each op collects the deferred depth reduce-scatter of the op after it in forward order."""
    if plan.tp_depth == 1 or not plan.overlap_tp_depth_reduce:
        return
    for prev, nxt in zip(ops, ops[1:]):
        prev.succ, nxt.defer = nxt.dw, True


def apply(model: nn.Module, spec: ModelSpec, plan: Plan, grid: Grid) -> TensorParallel:
    """Swap the meta model's layers for their 3D tensor-parallel versions (names unchanged)."""
    check(spec, plan)
    comm = Collectives(grid)
    env = _Env(spec, plan, comm, DepthStore(comm, plan.prefetch_tp_weights, plan.cache_tp_weights))
    ops: list[_DepthSharded] = []
    if hasattr(model, "tok_emb"):
        model.tok_emb = TPEmbedding(model.tok_emb, env)
        ops.append(model.tok_emb)
        if hasattr(model, "pos_emb"):
            model.pos_emb = TPPositions(model.pos_emb, env)
    for block in model.layers.values():
        block.attn_norm, block.mlp_norm = TPNorm(block.attn_norm, env), TPNorm(block.mlp_norm, env)
        mlp_in = ("w_gate", "w_up") if hasattr(block.mlp, "w_gate") else ("w_up",)
        for parent, names, orient in ((block.attn, ("wq", "wk", "wv"), QKV), (block.attn, ("wo",), OUT),
                                      (block.mlp, mlp_in, QKV), (block.mlp, ("w_down",), OUT)):
            for name in names:
                setattr(parent, name, TPLinear(getattr(parent, name), env, orient))
                ops.append(getattr(parent, name))
    if hasattr(model, "norm"):
        model.norm = TPNorm(model.norm, env)
        if hasattr(model, "head"):
            model.head = TPLinear(model.head, env, QKV)
            ops.append(model.head)
    _chain(ops, plan)
    tp = TensorParallel(comm, env.store, vocab_start=env.span(COL, spec.vocab_size).start)
    for prefix, module in model.named_modules():
        if hasattr(module, "param_shards"):
            for leaf, (shard, full, axes, split) in module.param_shards().items():
                name = f"{prefix}.{leaf}"
                tp.shards[name], tp.full_shapes[name], tp.grad_axes[name] = shard, tuple(full), axes
                tp.splits[name] = split
    return tp
