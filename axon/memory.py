"""Measured memory per rank: bytes of parameters, gradients and optimizer states (unique
storages actually allocated), and peak activation bytes (tensors autograd saves for backward).

The trainer writes `measured(...)` into plan.json as `memory.measured.{params,grads,optimizer,
activations}`, beside the performance model's `memory.predicted` (perfmodel/memory.py) with the
same keys, plus `host` for offloaded optimizer states.

Activations are counted with `torch.autograd.graph.saved_tensors_hooks`: every saved tensor that
is not a parameter (or a view of one) adds its storage's bytes once while any saved reference to
that storage is alive; the reference dies when autograd frees the graph (after backward), so
the meter tracks the live total and its peak across microbatches and pipeline schedules.
Tensors saved inside a recomputed region are not held (the checkpoint discards them) and are
not counted; what the region keeps is.
"""
from __future__ import annotations

import weakref
from typing import Any, Iterable, Mapping

import torch
from torch import nn


def storage_bytes(tensors: Iterable[torch.Tensor | None], seen: set[int] | None = None) -> int:
    """Bytes of the distinct storages behind `tensors` (views of one buffer count once)."""
    seen = set() if seen is None else seen
    total = 0
    for t in tensors:
        if t is None:
            continue
        st = t.untyped_storage()
        key = st.data_ptr()
        if st.nbytes() == 0 or key in seen:
            continue
        seen.add(key)
        total += st.nbytes()
    return total


def model_state_bytes(roles: Mapping[str, list[torch.Tensor]]) -> dict[str, int]:
    """{role: bytes} for tensors grouped by role ("params", "grads", "optimizer", "host"; a
    gradient engine's `state_tensors()`), each storage counted once, under the first role that
    names it."""
    seen: set[int] = set()
    return {role: storage_bytes(tensors, seen) for role, tensors in roles.items()}


def _is_param(t: torch.Tensor) -> bool:
    return isinstance(t, nn.Parameter) or isinstance(t._base, nn.Parameter)


class _Saved:
    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


class ActivationMeter:
    """Context manager counting live and peak bytes of saved activations (see module docstring).

        with ActivationMeter() as meter:
            loss = model(x).sum()      # meter.live grows
        loss.backward()                # graph freed: meter.live back to ~0
        meter.peak
    """

    def __init__(self) -> None:
        self.live = 0
        self.peak = 0
        self._refs: dict[int, int] = {}  # storage key -> live saved references
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def __enter__(self) -> "ActivationMeter":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)

    def _pack(self, t: torch.Tensor) -> Any:
        if _is_param(t):
            return t
        st = t.untyped_storage()
        key, nbytes = st.data_ptr(), st.nbytes()
        if nbytes == 0:
            return t
        holder = _Saved(t)
        if self._refs.get(key, 0) == 0:
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        self._refs[key] = self._refs.get(key, 0) + 1
        weakref.finalize(holder, self._release, key, nbytes)
        return holder

    def _release(self, key: int, nbytes: int) -> None:
        self._refs[key] -= 1
        if self._refs[key] == 0:
            del self._refs[key]
            self.live -= nbytes

    @staticmethod
    def _unpack(h: Any) -> torch.Tensor:
        return h.tensor if isinstance(h, _Saved) else h


def measured(roles: Mapping[str, list[torch.Tensor]], activation_peak: int,
             device: torch.device | None = None) -> dict[str, int]:
    """`memory.measured` for plan.json: params, grads, optimizer, host, activations; on a GPU also
    the caching allocator's peaks since the process started (`allocated_peak`: tensors, with every
    transient and the gathered buffers the roles leave out; `reserved_peak`: what the allocator
    held from the device, the number an out-of-memory error is about)."""
    out = {**model_state_bytes(roles), "activations": int(activation_peak)}
    if device is not None and device.type == "cuda":
        out["allocated_peak"] = torch.cuda.max_memory_allocated(device)
        out["reserved_peak"] = torch.cuda.max_memory_reserved(device)
    return out
