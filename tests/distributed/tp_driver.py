"""A small training-step driver for the tensor-parallel tests (run on every rank of a pool).

`parity(cases, steps)` runs, for each (plan fields, model fields) case, `steps` steps of two
microbatches (an SGD update between steps) on the 3D tensor-parallel model and on a
single-process reference of the same model, seed and data, sums gradients over each
parameter's declared `grad_axes` (what the data-parallel wrapper does), and returns per case
the losses, the worst relative error of every gradient over the steps, and the bytes counted.
The loss is `tp.loss_fn` of the logits, or with `chosen=True` the trainer's head loss
(parallel/head_loss.py `choose`: fused or not by perfmodel/memory.py fused_head_loss), whose
fused calls are counted (`fused_calls`); `seq` sets the sample length.
`layer_backward_collectives(plan, spec)` counts the torch.distributed calls made during one
middle Block's backward, per (axis, kind): (calls, message bytes); `grouped_on_other_inputs`
checks grouped projections fed different inputs against the full weights.
"""
from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F

from axon.init import materialize
from axon.model import build
from launch.grid import Grid
from parallel.head_loss import choose
from parallel.tensor import apply
from perfmodel.specs import ModelSpec, Plan

SEED, SEQ, MICRO = 3, 16, 2


def batch(spec: ModelSpec, plan: Plan, step: int, seq: int = SEQ) -> torch.Tensor:
    """The global batch of `step` [shards * MICRO, seq + 1], the same on every rank."""
    g = torch.Generator().manual_seed(11 + step)
    return torch.randint(0, spec.vocab_size, (plan.data_shards * MICRO, seq + 1), generator=g)


LR = 0.5


def build_reference(spec: ModelSpec) -> torch.nn.Module:
    model = build(spec)
    materialize(model, spec, SEED, torch.device("cpu"))
    return model


def reference_step(model: torch.nn.Module, tokens: torch.Tensor) -> float:
    logits = model(tokens[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten(), reduction="sum") / tokens[:, 1:].numel()
    loss.backward()
    return loss.item()


def sgd(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p -= LR * p.grad
            p.grad = None


def local_slice(full: torch.Tensor, shard) -> torch.Tensor:
    t = full.reshape(full.shape[0], -1) if full.dim() > 1 else full.reshape(-1, 1)
    t = t[shard.rows, shard.cols]
    return t.reshape(-1)[shard.flat] if shard.flat is not None else t


def build_tp(spec: ModelSpec, plan: Plan, grid: Grid):
    model = build(spec)
    tp = apply(model, spec, plan, grid)
    materialize(model, spec, SEED, torch.device("cpu"), tp.layouts)
    return model, tp


def chosen_loss(spec: ModelSpec, plan: Plan, tp, head: torch.nn.Module, calls: list) -> Callable:
    """(model, inputs, targets) -> the trainer's head loss of the model's hidden states, the token
    count of each call of the head's fused loss appended to `calls`."""
    loss_fn, fused_loss = choose(spec, plan, tp), head.fused_loss

    def counted(x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        calls.append(targets.numel())
        return fused_loss(x, targets)
    head.fused_loss = counted

    def loss_of(model, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(inputs.shape[1])  # as GPT.forward
        return loss_fn(model, model.blocks(model.embed(inputs, positions), positions), targets)
    return loss_of


def tp_step(model, tp, plan: Plan, grid: Grid, tokens: torch.Tensor, loss_of: Callable | None = None) -> float:
    """One step of MICRO microbatches (one sample each) on this rank's data shard; `loss_of(model,
    inputs, targets)` (default: the vocab-parallel loss of the model's logits)."""
    if loss_of is None:
        loss_of = lambda model, inputs, targets: tp.loss_fn(model(inputs), targets)  # noqa: E731
    c = grid.coords()
    shard = c["dp"] * plan.tp_depth + c["tp_depth"]
    mine = tokens[shard * MICRO:(shard + 1) * MICRO]
    n_tokens = tokens[:, 1:].numel()
    loss_sum = torch.zeros(())
    for i in range(MICRO):
        sample = mine[i:i + 1]
        loss = loss_of(model, sample[:, :-1], sample[:, 1:])
        (loss / n_tokens).backward()
        loss_sum += loss.detach()
    dist.all_reduce(loss_sum, group=grid.group("dp", "cp", "tp_depth").group)
    for name, p in model.named_parameters():
        dist.all_reduce(p.grad, group=grid.group(*tp.layouts[name].grad_axes).group)
    return loss_sum.item() / n_tokens


def parity(cases: list[tuple[dict, dict]], steps: int = 1, chosen: bool = False, seq: int = SEQ) -> list[dict]:
    out = []
    for plan_kw, spec_kw in cases:
        spec = ModelSpec(**spec_kw)
        plan = Plan(**plan_kw)
        grid = Grid.build(plan, dist.get_rank(), dist.get_world_size())
        ref = build_reference(spec)
        model, tp = build_tp(spec, plan, grid)
        res = {"loss": [], "ref_loss": [], "grad_err": {}, "bytes": [], "fused_calls": []}
        loss_of = chosen_loss(spec, plan, tp, model.head, res["fused_calls"]) if chosen else None
        for step in range(steps):
            tokens = batch(spec, plan, step, seq)
            res["ref_loss"].append(reference_step(ref, tokens))
            tp.comm.reset()
            res["loss"].append(tp_step(model, tp, plan, grid, tokens, loss_of))
            res["bytes"].append(tp.comm.reset())
            ref_grads = dict((n, p.grad) for n, p in ref.named_parameters())
            for name, p in model.named_parameters():
                want = local_slice(ref_grads[name], tp.layouts[name].shard).reshape(p.shape)
                # relative error; a gradient that is zero in exact arithmetic (the key bias with
                # learned positions: softmax ignores a per-query constant) is compared absolutely
                err = ((p.grad - want).norm() / want.norm().clamp_min(1e-3)).item()
                res["grad_err"][name] = max(err, res["grad_err"].get(name, 0.0))
            sgd(ref)
            sgd(model)
            tp.weights_changed()
        out.append(res)
    return out


# torch.distributed calls parallel/collectives.py makes -> (kind, the argument whose size is the
# message: the tensor, the gathered output, the reduce-scatter input)
_COUNTED = {"all_reduce": ("all_reduce", 0), "all_gather_single": ("all_gather", 0),
            "reduce_scatter_single": ("reduce_scatter", 1)}


@contextmanager
def counting_collectives(grid: Grid, counts: Counter) -> Iterator[None]:
    """While inside, every torch.distributed collective adds (axis, kind) -> calls and
    (axis, kind, "bytes") -> message bytes to `counts` (axis named by the grid's groups)."""
    axes = {id(grid.axis(a).group): a for a in ("tp_col", "tp_row", "tp_depth") if grid.axis(a).size > 1}
    originals = {name: getattr(dist, name) for name in _COUNTED}

    def wrap(name: str):
        kind, arg = _COUNTED[name]

        def counted(*args, group=None, **kwargs):
            key = (axes.get(id(group), "other"), kind)
            counts[key] += 1
            counts[key + ("bytes",)] += args[arg].numel() * args[arg].element_size()
            return originals[name](*args, group=group, **kwargs)
        return counted

    for name in _COUNTED:
        setattr(dist, name, wrap(name))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)


def layer_backward_collectives(plan_kw: dict, spec_kw: dict, layer: str = "1") -> dict:
    """{(axis, kind): (calls, bytes)} of the collectives launched during the backward of Block
    `layer` (from the gradient of its output to that of its input) in the second of two steps of
    one sample of SEQ tokens (the first teaches the depth prefetcher its order)."""
    spec, plan = ModelSpec(**spec_kw), Plan(**plan_kw)
    grid = Grid.build(plan, dist.get_rank(), dist.get_world_size())
    model, tp = build_tp(spec, plan, grid)
    block = model.layers[layer]
    at_start: list[Counter] = []
    window: list[Counter] = []
    counts: Counter = Counter()
    block.register_full_backward_pre_hook(lambda m, g: at_start.append(counts.copy()))
    block.register_full_backward_hook(lambda m, gi, go: window.append(counts - at_start[-1]))
    sample = batch(spec, plan, 0)[:1]
    for _ in range(2):
        window.clear()
        with counting_collectives(grid, counts):
            tp.loss_fn(model(sample[:, :-1]), sample[:, 1:]).backward()
        tp.weights_changed()
    (got,) = window
    return {key: (n, got[key + ("bytes",)]) for key, n in got.items() if len(key) == 2}


def grouped_on_other_inputs(plan_kw: dict, spec_kw: dict) -> dict[str, float]:
    """Layer 0's grouped wq, wk, wv called as wq(x1), wk(x2), wv(x1) (not the one shared input the
    group expects) on a 1D layout: the relative error of each output and of the gradients of x1,
    x2 and the weights against the full weights of the single-process model."""
    spec, plan = ModelSpec(**spec_kw), Plan(**plan_kw)
    grid = Grid.build(plan, dist.get_rank(), dist.get_world_size())
    tp_attn, full = build_tp(spec, plan, grid)[0].layers["0"].attn, build_reference(spec).layers["0"].attn
    names, which = ("wq", "wk", "wv"), (0, 1, 0)
    rows = [getattr(tp_attn, n).row_span for n in names]  # this rank's output columns
    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(1, SEQ, spec.d_model, generator=g) for _ in range(2)]  # [1, S, d]
    dys = [torch.randn(1, SEQ, getattr(full, n).weight.shape[0], generator=g) for n in names]  # [1, S, out]

    def run(attn: torch.nn.Module, cols: list[slice]) -> tuple[list[torch.Tensor], ...]:
        leaves = [x.clone().requires_grad_() for x in xs]
        ys = [getattr(attn, n)(leaves[i]) for n, i in zip(names, which)]  # [1, S, out(/tp_col)]
        sum((y * dy[..., c]).sum() for y, dy, c in zip(ys, dys, cols)).backward()
        return [y.detach() for y in ys], [x.grad for x in leaves], [getattr(attn, n).weight.grad for n in names]

    got, want = run(tp_attn, rows), run(full, [slice(None)] * 3)
    want = ([y[..., r] for y, r in zip(want[0], rows)], want[1], [w[r] for w, r in zip(want[2], rows)])
    kinds = ([f"{n} output" for n in names], ["x1 grad", "x2 grad"], [f"{n} weight grad" for n in names])
    return {name: ((a - b).norm() / b.norm()).item()
            for names_, gs, ws in zip(kinds, got, want) for name, a, b in zip(names_, gs, ws)}
