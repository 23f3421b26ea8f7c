"""Optimizer offload: fp32 master weights and Adam m, v in host memory, the AdamW update computed
on the host (`plan.offload.optimizer`).

Per step: every gradient shard is copied device -> host, each unit is updated on the host as soon
as its gradient has arrived, and its new weights are copied host -> device. On a GPU the copies
run on a side stream from pinned buffers, so the copy of unit i+1's gradient and of unit i-1's
weights overlap the host update of unit i; events order each copy against the host code that
reads or rewrites its buffer. On the CPU the same code runs with plain copies (no streams), so
the path is exercised by the CPU tests.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch

from parallel.zero_optim import adamw_
from perfmodel.specs import Optim


class HostAdamW:
    """AdamW whose master weights and states live on the host; `params` are the device shards."""

    def __init__(self, params: list[torch.Tensor], decay: list[list[tuple[int, int]]], cfg: Optim):
        self.params, self.decay, self.cfg = params, decay, cfg
        self.cuda = params[0].is_cuda if params else False
        pin = self.cuda

        def host_like(p: torch.Tensor) -> torch.Tensor:
            return torch.zeros(p.shape, dtype=torch.float32, device="cpu", pin_memory=pin)

        self.master = [host_like(p) for p in params]
        self.exp_avg = [host_like(p) for p in params]
        self.exp_avg_sq = [host_like(p) for p in params]
        self.grad_host = [host_like(p) for p in params]  # pinned landing buffers for the gradients
        self.step_count = torch.zeros((), dtype=torch.float32)
        self.stream = torch.cuda.Stream(params[0].device) if self.cuda else None
        self._uploaded: list[Any] = [None] * len(params)  # event: unit's weights reached the device
        self.reload_params()

    def _side(self) -> Any:
        return torch.cuda.stream(self.stream) if self.cuda else nullcontext()

    def _event(self) -> Any:
        if not self.cuda:
            return None
        ev = torch.cuda.Event()
        ev.record(self.stream)
        return ev

    def step(self, grads: list[torch.Tensor], lr: float) -> None:
        self.step_count += 1
        step = self.step_count.item()
        if self.cuda:
            self.stream.wait_stream(torch.cuda.current_stream(self.params[0].device))  # grads are final
        arrived = []
        with self._side():
            for g, host in zip(grads, self.grad_host):
                host.copy_(g, non_blocking=True)  # device -> host, queued back to back
                arrived.append(self._event())
        for i, p in enumerate(self.params):
            if arrived[i] is not None:
                arrived[i].synchronize()
            if self._uploaded[i] is not None:  # last step's upload still reads master[i]
                self._uploaded[i].synchronize()
            adamw_(self.master[i], self.grad_host[i], self.exp_avg[i], self.exp_avg_sq[i], step, lr, self.cfg,
                   self.decay[i])
            with self._side():
                p.copy_(self.master[i], non_blocking=True)  # host -> device
                self._uploaded[i] = self._event()
        if self.cuda:
            torch.cuda.current_stream(self.params[0].device).wait_stream(self.stream)

    def use_params(self, params: list[torch.Tensor]) -> None:
        """Update `params` from now on (the same values: the engine moved its master shards)."""
        self.params = params

    def reload_params(self) -> None:
        """Take the master weights from the device shards (at start and after a checkpoint load)."""
        for p, host in zip(self.params, self.master):
            host.copy_(p)

    def device_states(self) -> list[torch.Tensor]:
        return []

    def host_states(self) -> list[torch.Tensor]:
        return self.master + self.exp_avg + self.exp_avg_sq + self.grad_host
