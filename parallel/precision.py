"""Mixed precision (`train.dtype`): fp32 master weights where the optimizer lives, bf16 compute
weights made once per step, fp32 gradients (reduced in fp32, or in bf16 under
`parallel.reduce_dtype=bf16`: `reduce_dtype`).

    policy = precision.policy("bf16", device)          # frozen: which dtype computes
    prec = precision.build(policy, chunks, engine)     # engine.compute_weights(dtype) when mixed
    with prec.step():                                  # one pipeline step (parallel/executor.py)
        with prec.forward(): ...                       # each forward action: autocast

Under bf16 the gradient engine (parallel/data_engine.py, parallel/zero.py) keeps the fp32
parameters (the masters, which the optimizer updates, checkpoints save and gradients accumulate
into) and gives one bf16 compute tensor per parameter, refreshed after every optimizer step (ZeRO-3:
a bf16 shard copy, gathered into a bf16 flat buffer instead of the fp32 one). For the step, each
module's parameter attribute is shadowed (the instance `__dict__` entry wins over
`nn.Module.__getattr__`, so `named_parameters()` still yields the masters) by `_Compute(master,
weight)`: the compute tensor itself in forward, and in backward its gradient handed to the master
in fp32, so autograd accumulates every microbatch into the fp32 gradient buffers and the engines'
post-accumulate hooks fire as in fp32. The alias is made once per step and shared by every
microbatch's graph (it saves nothing, so several backwards pass through it), which is what removes
autocast's per-microbatch weight copies: autocast leaves bf16 inputs alone. Autocast still runs
each forward (fp32 ops such as softmax, fp32 activations into matmuls); the loss runs outside it in
fp32 (the executor). Compute tensors view their buffer with their own version counter (set through
`.data`, as ZeRO's parameters do), so a ZeRO-3 regather inside the step does not invalidate what
autograd saved, and they are (non-trainable) Parameters, so activation meters that skip parameters
and views of them skip them too.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping

import torch
from torch import nn

from perfmodel.specs import PlanError

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass(frozen=True)
class Policy:
    compute: torch.dtype  # weights and matmuls of the forward/backward; float32: plain fp32
    device_type: str

    @property
    def mixed(self) -> bool:
        return self.compute != torch.float32


def policy(dtype: str, device: torch.device) -> Policy:
    """`train.dtype`: auto (bf16 on GPUs, fp32 on CPU), fp32 or bf16."""
    if dtype == "auto":
        dtype = "bf16" if device.type == "cuda" else "fp32"
    if dtype not in DTYPES:
        raise PlanError(f"train.dtype={dtype!r} must be auto, fp32 or bf16")
    return Policy(DTYPES[dtype], device.type)


def reduce_dtype(plan_reduce_dtype: str) -> torch.dtype:
    """`parallel.reduce_dtype` (perfmodel/rules.py validated it): the dtype the gradient engines
    reduce in. Gradients accumulate in their fp32 buffers either way; under bf16 each reduction
    moves a bf16 copy (half the bytes) and its sum, rounded to bf16, is copied back, as FSDP2's
    `reduce_dtype` and Megatron's `grad_reduce_in_bf16` do. A group of one rank reduces nothing and
    rounds nothing."""
    return DTYPES[plan_reduce_dtype]


def compute_tensor(view: torch.Tensor) -> nn.Parameter:
    """A non-trainable Parameter showing `view` (of a compute buffer) with its own version counter."""
    w = nn.Parameter(torch.empty(0, dtype=view.dtype, device=view.device), requires_grad=False)
    w.data = view
    return w


class _Compute(torch.autograd.Function):
    """master (fp32, possibly freed) -> its compute tensor; backward: the gradient, in the master's dtype."""

    @staticmethod
    def forward(ctx: Any, master: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.set_materialize_grads(False)
        ctx.dtype = master.dtype
        return weight

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor | None) -> tuple[torch.Tensor | None, None]:
        return (None if grad is None else grad.to(ctx.dtype)), None


class Precision:
    """The runtime side of a Policy: the compute tensors and the modules whose attributes they shadow."""

    def __init__(self, policy: Policy, chunks: Iterable[nn.Module] = (),
                 weights: Mapping[nn.Parameter, torch.Tensor] | None = None):
        self.policy = policy
        self.weights = dict(weights or {})
        self._slots = [(m, name, p) for chunk in chunks for m in chunk.modules()
                       for name, p in m.named_parameters(recurse=False) if p in self.weights]

    def forward(self) -> Any:
        """The context of one forward action: autocast to the compute dtype when mixed."""
        if not self.policy.mixed:
            return nullcontext()
        return torch.autocast(self.policy.device_type, dtype=self.policy.compute)

    @contextmanager
    def step(self) -> Iterator[None]:
        """Within: every module reads its parameters' compute tensors (see the module docstring)."""
        if not self._slots:
            yield
            return
        alias: dict[nn.Parameter, torch.Tensor] = {}
        with torch.enable_grad():
            for p, w in self.weights.items():
                alias[p] = _Compute.apply(p, w) if p.requires_grad else w
        for m, name, p in self._slots:
            m.__dict__[name] = alias[p]
        try:
            yield
        finally:
            for m, name, _ in self._slots:
                m.__dict__.pop(name, None)

    def activation_dtype(self, param_dtype: torch.dtype) -> torch.dtype:
        """What a chunk's output (the pipeline's messages) is made of."""
        return self.policy.compute if self.policy.mixed else param_dtype

    def compute_tensors(self) -> list[torch.Tensor]:
        return list(self.weights.values())


def build(policy: Policy, chunks: Iterable[nn.Module], engine: Any) -> Precision:
    """The Precision for this rank's `chunks`; mixed asks `engine` (a GradEngine) for compute weights."""
    chunks = list(chunks)
    if not policy.mixed:
        return Precision(policy)
    return Precision(policy, chunks, engine.compute_weights(policy.compute))


FP32 = Precision(Policy(torch.float32, "cpu"))  # nothing to do: no autocast, no compute weights
