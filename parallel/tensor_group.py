"""Column-parallel projections that read one input (parallel/tensor.py's QKV-type ops): one
autograd node computes every op's output from the shared input and reduces the summed input
gradient once over the out-axis, as Megatron's fused QKV and fc1 do; under sequence
parallelism it gathers the sequence-sharded input and reduce-scatters the gradient.

    group = Group([wq, wk, wv])       # TPLinear ops of parallel/tensor.py, in forward order
    y = group.output(op, x)           # op's output [B, S, out_l]; the first call computes all
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import torch

from kernels import gemm
from parallel.layout import TP_AXES
from parallel.sequence import SEQ_DIM

if TYPE_CHECKING:
    from parallel.tensor import TPLinear

COL = TP_AXES[0]


class Projections(torch.autograd.Function):
    """y_i = x W_i^T for each op of a `Group` (the [rows, cols] pieces W_i of depth-sharded
    weights), all reading the same x. Backward sums the ops' local input gradients and reduces the
    sum once over the out-axis (async, overlapped with the dW GEMMs), as Megatron's fused QKV and
    fc1 do. `succ` is the weight of the op after the group in forward order, whose deferred depth
    reduce-scatter this backward collects; inside the group each op collects the next one's.

    Under sequence parallelism (`Group.gathers`) x arrives sequence-sharded [B, S/tp_col, in_l]:
    forward gathers the sequence, and only the shard is saved; backward gathers it again for the
    dW GEMMs (launched first, hidden behind the dX GEMMs) and reduce-scatters the summed dX over
    the sequence, as Megatron-SP does (the gathered input is never kept between the passes)."""

    @staticmethod
    def forward(ctx, x, succ, group: "Group", *weights):
        ys = []
        ctx.save_for_backward(x)  # under SP the shard [B, S/tp_col, in_l]
        if group.gathers:
            x = group.ops[0].comm.gather_along(x, COL, SEQ_DIM)  # [B, S, in_l]
        x2 = x.reshape(-1, x.shape[-1])  # [tokens, in_l]
        for op in group.ops:
            w = op.store.weight(op.dw, "fwd")  # [out_l, in_l]
            form = gemm.choose(op.gemm_table, "fwd", x2.shape[0], *w.shape, gemm.compute_dtype(x))
            y = gemm.forward(x2, w, None, form).view(*x.shape[:-1], w.shape[0])  # [B, S, out_l] partial over the in-axis
            if op.reduce_out:
                op.comm.all_reduce(y, op.in_axis)
            ys.append(y)
        ctx.group, ctx.has_succ = group, succ is not None
        return tuple(ys)

    @staticmethod
    def backward(ctx, *dys):
        (x,) = ctx.saved_tensors
        group: Group = ctx.group
        comm = group.ops[0].comm
        full, gathered = comm.start_gather_along(x, COL, SEQ_DIM) if group.gathers else (x, None)  # [B, S, in_l]
        dx = group.input_grad(dys)  # [B, S, in_l], summed over the group
        handle = group.reduce_input_grad(dx)
        if gathered is not None:
            gathered.wait()
            dx = comm.scatter_along(dx, COL, SEQ_DIM)  # [B, S/tp_col, in_l], summed over tp_col
        dweights = group.weight_grads(full, dys)
        dsucc = group.ops[-1].store.take_deferred(group.ops[-1].succ) if ctx.has_succ else None
        if handle is not None:
            handle.wait()
        return (dx.to(x.dtype), dsucc, None, *dweights)


class Group:
    """Column-parallel projections that read the same input (GPT: wq, wk, wv; w_gate, w_up; any
    other TPLinear is a group of one). The first op called computes every op's output in one
    `Projections` node, whose backward reduces the summed input gradient once; the others take
    theirs. An op called on another input (or twice) starts a new node: still exact, only slower."""

    def __init__(self, ops: list["TPLinear"]):
        self.ops = ops
        self.gathers = ops[0].gather  # input sequence-sharded (SP): gathered inside `Projections`
        self._x: Optional[torch.Tensor] = None
        self._ready: dict[int, torch.Tensor] = {}  # by position in `ops`: computed, not yet taken

    def output(self, op: "TPLinear", x: torch.Tensor) -> torch.Tensor:
        i = self.ops.index(op)
        if x is not self._x or i not in self._ready:
            ys = Projections.apply(x, self.ops[-1].succ_param(), self, *(o.weight for o in self.ops))
            self._x, self._ready = x, dict(enumerate(ys))
        y = self._ready.pop(i)
        if not self._ready:
            self._x = None  # every op took its output: hold nothing between steps
        return y

    def input_grad(self, dys: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The sum of the ops' local input gradients dy_i W_i [B, S, in_l], partial over the out-axis."""
        dx = None
        for op, dy in reversed(list(zip(self.ops, dys))):
            w = op.store.weight(op.dw, "bwd").to(dy.dtype)  # gathered again unless cached (autocast: dy's dtype)
            dy2 = dy.reshape(-1, dy.shape[-1])  # [tokens, out_l]
            form = gemm.choose(op.gemm_table, "dx", dy2.shape[0], *w.shape, dy.dtype)
            if dx is None:
                dx = gemm.input_grad(dy2, w, form).view(*dy.shape[:-1], w.shape[1])  # [B, S, in_l]
            else:
                gemm.input_grad(dy2, w, form, acc=dx.view(-1, dx.shape[-1]))
        return dx

    def reduce_input_grad(self, dx: torch.Tensor) -> Any:
        """Launch the one reduction of the group's input gradient (None under SP: `Projections`
        reduce-scatters it over the sequence)."""
        op = self.ops[0]
        if not op.reduce_in_grad:
            return None
        return op.comm.all_reduce(dx, op.out_axis, async_op=op.overlap_dx)

    def weight_grads(self, x: torch.Tensor, dys: tuple[torch.Tensor, ...]) -> list[Optional[torch.Tensor]]:
        """dW_i = dy_i^T x, reduce-scattered over depth: the first op's deferred to the op before
        the group (None here), the others' launched in turn and collected after the last GEMM."""
        x2 = x.reshape(-1, x.shape[-1])  # [tokens, in_l]
        grads: list[Optional[torch.Tensor]] = [None] * len(self.ops)
        for i in reversed(range(len(self.ops))):
            op, dy = self.ops[i], dys[i]
            dy2 = dy.reshape(-1, dy.shape[-1])  # [tokens, out_l]
            form = gemm.choose(op.gemm_table, "dw", dy2.shape[0], dy2.shape[1], x2.shape[1], dy.dtype)
            dw = gemm.weight_grad(dy2, x2.to(dy.dtype), form)  # [out_l, in_l]
            grads[i] = op.store.reduce_grad(op.dw, dw.to(op.weight.dtype), defer=op.defer)
        for i, op in enumerate(self.ops[1:], 1):
            if grads[i] is None:  # deferred to the op before it, which is in this group
                grads[i] = op.store.take_deferred(op.dw)
        return grads
