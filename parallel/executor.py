"""One executor for every pipeline schedule: runs this rank's action list (perfmodel/schedules.py)
on its model chunks.

    ex = Executor(chunks, n_chunks, p2p, store, stash, b_params)   # the last two: split backward only
    loss_sum = ex.run(actions, microbatches, loss_fn, global_tokens, engine, precision)

F runs a chunk's forward (embedding on the first chunk; on the last, the head and the loss:
`loss_fn(chunk, x, targets)`, parallel/head_loss.py, which computes the loss in fp32) under the
activation store's saved-tensor hooks and `precision.forward()` (autocast when mixed); the whole
action list runs inside `precision.step()`, where the modules read the step's compute weights
(parallel/precision.py: one bf16 copy per step, not one per microbatch). B runs its backward;
when the schedule splits the backward (a W appears), B computes only the input gradients and W
the weight gradients:

B/W split (zero-bubble style, no recomputation): every plain `nn.Linear` of a chunk but the head
(the fused head loss computes the head's weight gradient in the same pass as its input gradient,
so it comes in B) becomes a
`DeferredLinear` whose backward returns dX = dY W and, instead of computing dW, stashes (X, dY)
for the (chunk, microbatch) being run. W computes dW = dY^T X (and db = sum dY) from the stash
and accumulates them with one `torch.autograd.backward(weights, dWs)`, so the gradients land
through autograd (the data-parallel post-accumulate hooks fire). Cost: no extra FLOPs; the
stash keeps X (already saved by the forward) and dY (one output-sized tensor per Linear) from B
to W. Parameters that are not plain Linear weights (norms, embeddings, tensor-parallel layers)
get their gradients in B. B runs its backward with `inputs=` the chunk's input and the parameters
it owns, so autograd never visits the deferred weights' accumulators: their gradient hooks (the
data-parallel bucket triggers) fire only when W really produces the gradient. (A custom Function
returning None for a leaf still runs the leaf's post-accumulate hooks, which would mark the
bucket ready at B and reduce it before W wrote into it.)

`engine.set_last_backward(True)` (the gradient engine's reduction trigger; None: nothing to
reduce) holds exactly during the last backward action that produces each chunk's gradients: its
last B and, when split, its last W.
Messages: a maximal run of SEND/RECV actions is posted as one batch; a RECV is waited for just
before the compute that consumes it; sends are waited for at the end of the step.

Forward only (`forward_only`, the validation loss): the action list keeps its F, SEND_F and
RECV_F actions in their order and runs under `torch.no_grad()` with no gradient engine and no
saved-tensor hooks; every rank filters its own list the same way, so the sends and receives still
pair up, and since each kept action waits on nothing the full list did not wait on, no new
deadlock can appear. No backward, no gradient reduction, the weights unchanged.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

from kernels import gemm
from parallel.activation_offload import ActivationStore
from parallel.grad_engine import GradEngine
from parallel.head_loss import HeadLoss
from parallel.p2p import P2P
from parallel.precision import FP32, Precision
from perfmodel.schedules import B, COMM, OFFLOAD, RECV_B, RECV_F, RELOAD, SEND_B, SEND_F, W, Action
from perfmodel.schedules import F as FWD

FORWARD_KINDS = (FWD, SEND_F, RECV_F)  # what a forward-only step keeps of an action list


def forward_only(actions: list[Action]) -> list[Action]:
    """The forward actions of a schedule's action list, in order (see the module docstring)."""
    return [a for a in actions if a.kind in FORWARD_KINDS]

# inputs [b, S], targets [b, S], positions [S] (or [b, S]: packed rows, axon/sft_data.py)
Microbatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class WeightGradStash:
    """(Linear, X, dY) triples deferred by B, collected per (chunk, microbatch) for W."""

    def __init__(self) -> None:
        self.active: list[tuple[nn.Linear, torch.Tensor, torch.Tensor]] | None = None

    def flush(self, items: list[tuple[nn.Linear, torch.Tensor, torch.Tensor]]) -> None:
        """Compute and accumulate the deferred weight (and bias) gradients."""
        params, grads = [], []
        for linear, x, dy in items:
            x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])  # [tokens, in], [tokens, out]
            params.append(linear.weight)
            form = gemm.choose(linear.gemm_table, "dw", dy2.shape[0], *linear.weight.shape, dy2.dtype)
            grads.append(gemm.weight_grad(dy2, x2.to(dy2.dtype), form).to(linear.weight.dtype))  # [out, in]
            if linear.bias is not None:
                params.append(linear.bias)
                grads.append(dy2.sum(0).to(linear.bias.dtype))  # [out]
        if params:
            torch.autograd.backward(params, grads)


class _DeferredLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, linear, stash):
        ctx.linear, ctx.stash = linear, stash
        ctx.save_for_backward(x, weight)
        x2 = x.reshape(-1, x.shape[-1])  # [tokens, in]
        form = gemm.choose(linear.gemm_table, "fwd", x2.shape[0], *weight.shape, gemm.compute_dtype(x))
        return gemm.forward(x2, weight, bias, form).view(*x.shape[:-1], weight.shape[0])  # [..., out]

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        table, dy2 = ctx.linear.gemm_table, dy.reshape(-1, dy.shape[-1])  # [tokens, out]
        form = gemm.choose(table, "dx", dy2.shape[0], *weight.shape, dy.dtype)
        dx = gemm.input_grad(dy2, weight.to(dy.dtype), form).view(*dy.shape[:-1], weight.shape[1]).to(x.dtype)
        if ctx.stash.active is None:  # not deferring (a full backward): weight grads now
            x2 = x.reshape(-1, x.shape[-1])  # [tokens, in]
            form = gemm.choose(table, "dw", dy2.shape[0], *weight.shape, dy.dtype)
            dw = gemm.weight_grad(dy2, x2.to(dy2.dtype), form).to(weight.dtype)
            db = dy2.sum(0).to(weight.dtype) if ctx.linear.bias is not None else None
            return dx, dw, db, None, None
        ctx.stash.active.append((ctx.linear, x, dy))
        return dx, None, None, None, None


class DeferredLinear(nn.Linear):
    """nn.Linear whose weight gradient can be deferred to W (see the module docstring); its GEMMs
    run in the layouts of `gemm_table` (kernels/gemm.py; None: torch's)."""

    stash: WeightGradStash
    gemm_table = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _DeferredLinearFn.apply(x, self.weight, self.bias, self, self.stash)


def defer_weight_grads(chunk: nn.Module, stash: WeightGradStash) -> list[nn.Parameter]:
    """Turn the chunk's nn.Linear modules (axon.model.Linear included) but its head (`chunk.head`,
    whose weight the fused head loss reads directly) into DeferredLinear in place (parameters,
    names and values unchanged, as torch's fully_shard does with its module classes). Returns the
    chunk's parameters whose gradients B still computes (all but the deferred weights and biases)."""
    deferred: set[int] = set()
    head = getattr(chunk, "head", None)
    for module in chunk.modules():
        if isinstance(module, nn.Linear) and not isinstance(module, DeferredLinear) and module is not head:
            module.__class__ = DeferredLinear
            module.stash = stash
            deferred.update(id(p) for p in module.parameters())
    return [p for p in chunk.parameters() if id(p) not in deferred and p.requires_grad]


def _tag(kind: str, microbatch: int, chunk: int, n_chunks: int) -> int:
    """Message tag naming (direction, microbatch, receiving chunk); both ends compute the same."""
    forward = kind in (SEND_F, RECV_F)
    receiver = chunk + 1 if kind == SEND_F else chunk - 1 if kind == SEND_B else chunk
    return (microbatch * n_chunks + receiver) * 2 + (0 if forward else 1)


class Executor:
    def __init__(self, chunks: dict[int, nn.Module], n_chunks: int, p2p: P2P, store: ActivationStore,
                 stash: WeightGradStash | None = None, b_params: dict[int, list[nn.Parameter]] | None = None):
        """`stash` and `b_params` (per chunk, the parameters B computes gradients for; from
        `defer_weight_grads`) only for split-backward schedules."""
        self.chunks, self.n_chunks, self.p2p, self.store, self.stash = chunks, n_chunks, p2p, store, stash
        self.b_params = b_params or {}

    def run(self, actions: list[Action], microbatches: list[Microbatch], loss_fn: HeadLoss, global_tokens: int,
            engine: GradEngine | None, precision: Precision | None = None,
            track: bool = True) -> torch.Tensor:
        """Run one step's actions; returns the summed loss of the microbatches (0 unless this rank
        holds the last chunk). `track`: run the activation store's saved-tensor hooks (memory
        accounting); they run anyway when the actions offload."""
        precision = precision if precision is not None else FP32
        with precision.step():
            loss_sum = self._run(actions, microbatches, loss_fn, global_tokens, engine, precision, track)
        self.p2p.wait_sends()
        return loss_sum

    def forward(self, actions: list[Action], microbatches: list[Microbatch], loss_fn: HeadLoss,
                precision: Precision | None = None) -> torch.Tensor:
        """Forward only: the F / SEND_F / RECV_F actions of `actions` under no_grad; returns the
        summed loss of the microbatches (0 unless this rank holds the last chunk)."""
        with torch.no_grad():
            return self.run(forward_only(actions), microbatches, loss_fn, 1, None, precision, track=False)

    def _run(self, actions: list[Action], microbatches: list[Microbatch], loss_fn: HeadLoss, global_tokens: int,
             engine: GradEngine | None, precision: Precision, track: bool) -> torch.Tensor:
        last_backward = engine.set_last_backward if engine is not None else lambda last: None
        split = any(a.kind == W for a in actions)
        hooks = track or any(a.kind == OFFLOAD for a in actions)
        last_grad = {(a.chunk, a.kind): k for k, a in enumerate(actions) if a.kind in (B, W)}
        final = set(last_grad.values())
        state = _StepState()
        device = self.p2p.device
        loss_sum = torch.zeros((), device=device)
        k = 0
        while k < len(actions):
            a = actions[k]
            if a.kind in COMM:
                end = k
                while end < len(actions) and actions[end].kind in COMM:
                    end += 1
                self._post(actions[k:end], state)
                k = end
                continue
            if a.kind == FWD:
                with precision.forward():
                    loss = self._forward(a, microbatches[a.microbatch], loss_fn, state, hooks)
                if loss is not None:
                    loss_sum += loss.detach()
            elif a.kind == B:
                last_backward(k in final)
                self._backward(a, global_tokens, split, state)
            elif a.kind == W:
                last_backward(k in final)
                self.stash.flush(state.deferred.pop((a.chunk, a.microbatch)))
                self.store.release((a.chunk, a.microbatch), saved=False)
            elif a.kind == OFFLOAD:
                self.store.offload((a.chunk, a.microbatch))
            elif a.kind == RELOAD:
                self.store.reload((a.chunk, a.microbatch))
            k += 1
        last_backward(True)
        return loss_sum

    def _post(self, batch: list[Action], state: "_StepState") -> None:
        msgs = []
        for a in batch:
            tag = _tag(a.kind, a.microbatch, a.chunk, self.n_chunks)
            what = f"{a.kind} microbatch {a.microbatch} chunk {a.chunk} {'to' if 'SEND' in a.kind else 'from'} pp rank {a.peer}"
            if a.kind == SEND_F:
                msgs.append(("send", a.peer, tag, state.outputs[(a.chunk, a.microbatch)], what))
            elif a.kind == SEND_B:
                msgs.append(("send", a.peer, tag, state.input_grads.pop((a.chunk, a.microbatch)), what))
            else:
                msgs.append(("recv", a.peer, tag, None, what))
                state.pending[(a.kind, a.chunk, a.microbatch)] = tag
        self.p2p.post(msgs)

    def _take(self, kind: str, key: tuple[int, int], local: dict, state: "_StepState") -> torch.Tensor:
        """The tensor a compute consumes: from the local handoff or the posted RECV."""
        if key in local:
            return local.pop(key)
        tag = state.pending.pop((kind, *key))
        return self.p2p.wait_recv(tag)

    def _forward(self, a: Action, mb: Microbatch, loss_fn: HeadLoss, state: "_StepState",
                 hooks: bool) -> torch.Tensor | None:
        key = (a.chunk, a.microbatch)
        chunk = self.chunks[a.chunk]
        inputs, targets, positions = mb
        with self.store.saving(key) if hooks else nullcontext():
            if a.chunk == 0:
                x = chunk.embed(inputs, positions)  # [b, S, h]
            else:
                x = self._take(RECV_F, key, state.handoff_f, state)  # [b, S, h]
                if torch.is_grad_enabled():  # its .grad is the input gradient B sends back
                    state.inputs[key] = x.requires_grad_()
            x = chunk.blocks(x, positions)  # [b, S, h]
            if a.chunk == self.n_chunks - 1:
                out = loss_fn(chunk, x, targets)  # scalar: sum of token losses
            else:
                out = x
        state.outputs[key] = out
        if a.chunk + 1 in self.chunks and a.chunk + 1 < self.n_chunks:  # next chunk on this rank
            state.handoff_f[(a.chunk + 1, a.microbatch)] = out.detach()
        return out if a.chunk == self.n_chunks - 1 else None

    def _backward(self, a: Action, global_tokens: int, split: bool, state: "_StepState") -> None:
        key = (a.chunk, a.microbatch)
        out = state.outputs.pop(key)
        if a.chunk == self.n_chunks - 1:
            root, grad = out / global_tokens, None
        else:
            root, grad = out, self._take(RECV_B, key, state.handoff_b, state)  # [b, S, h]
        deferred: list = []
        inputs = None
        if split:
            self.stash.active = deferred
            inputs = ([state.inputs[key]] if a.chunk > 0 else []) + self.b_params[a.chunk]
        try:
            torch.autograd.backward(root, grad, inputs=inputs)
        finally:
            if self.stash is not None:
                self.stash.active = None
        self.store.release(key, held=False)
        if split:
            state.deferred[key] = deferred
            self.store.hold(key, [t for _, x, dy in deferred for t in (x, dy)])
        if a.chunk > 0:
            dx = state.inputs.pop(key).grad  # [b, S, h]
            if a.chunk - 1 in self.chunks:
                state.handoff_b[(a.chunk - 1, a.microbatch)] = dx
            else:
                state.input_grads[key] = dx


class _StepState:
    """Tensors in flight within one step, keyed by (chunk, microbatch)."""

    def __init__(self) -> None:
        self.inputs: dict = {}  # chunk input leaves (their .grad is the input gradient)
        self.outputs: dict = {}  # chunk outputs (or the loss on the last chunk), kept for B and SEND_F
        self.input_grads: dict = {}  # dX waiting for SEND_B
        self.handoff_f: dict = {}  # outputs passed to the next chunk on this rank
        self.handoff_b: dict = {}  # input grads passed to the previous chunk on this rank
        self.pending: dict = {}  # (RECV kind, chunk, microbatch) -> tag
        self.deferred: dict = {}  # W stash per (chunk, microbatch)
