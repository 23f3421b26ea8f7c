"""Pipeline point-to-point: batched non-blocking send/recv between pipeline ranks.

    p2p = P2P(grid.axis("pp"), shape=(mbs, S, d), dtype=torch.float32, device=device)
    p2p.post([("send", peer, tag, tensor), ("recv", peer, tag, None)])  # one batch
    x = p2p.wait_recv(tag)        # just before the compute that consumes it
    p2p.wait_sends()              # at the end of the step

Every message is one activation or activation gradient of the shape fixed ahead from the model
spec and the microbatch (no shape handshake): receive buffers are allocated without asking the
sender. A batch is posted with `batch_isend_irecv` (one coalesced launch on NCCL; on gloo a
series of isend/irecv). Sends complete in the background while the rank computes and are waited
for at the end of the step. Each message carries a tag naming (direction, microbatch, chunk), so
gloo matches it exactly; NCCL ignores tags and matches in posting order, which the schedule
builder guarantees (perfmodel/schedules.py). On gloo a wait that exceeds `timeout_s`, or a peer
whose connection drops, raises P2PError naming the message and the peer instead of hanging; on NCCL
waits do not block the host and the group's timeout (NCCL's watchdog) ends a hung transfer.
"""
from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from launch.grid import Axis


class P2PError(RuntimeError):
    """A pipeline message that failed or did not arrive in time (a peer died or hangs)."""


class P2P:
    def __init__(self, axis: Axis, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                 timeout_s: float = 300.0):
        self.axis, self.shape, self.dtype, self.device = axis, tuple(shape), dtype, device
        self.timeout = timedelta(seconds=timeout_s)
        # gloo: wait with the timeout (the host thread is the transfer). NCCL: a plain wait() only
        # makes the compute stream wait for the transfer, so the host keeps queueing work ahead;
        # `wait(timeout)` would block the host until the transfer ends. NCCL's watchdog ends a
        # transfer that exceeds the group's timeout (launch.timeout_s) and fails the rank.
        self._host_wait = torch.device(device).type == "cpu"
        self._recvs: dict[int, tuple[Any, torch.Tensor, str]] = {}  # tag -> (work, buffer, what)
        self._sends: list[tuple[Any, torch.Tensor, str]] = []  # kept alive until waited
        self.bytes_sent = 0

    def post(self, batch: list[tuple[str, int, int, torch.Tensor | None, str]]) -> None:
        """Post one batch of ("send"|"recv", peer coord on the pp axis, tag, tensor or None, what)."""
        ops, kept = [], []
        for kind, peer, tag, tensor, what in batch:
            global_peer = self.axis.ranks[peer]
            if kind == "send":
                if tuple(tensor.shape) != self.shape:
                    raise P2PError(f"{what}: sending shape {tuple(tensor.shape)} but the pipeline expects "
                                   f"{self.shape} (every stage boundary carries [micro_batch, seq, d_model])")
                tensor = tensor.detach().to(self.dtype).contiguous()
                ops.append(dist.P2POp(dist.isend, tensor, global_peer, self.axis.group, tag))
                kept.append(("send", tensor, what))
                self.bytes_sent += tensor.numel() * tensor.element_size()
            else:
                buf = torch.empty(self.shape, dtype=self.dtype, device=self.device)
                ops.append(dist.P2POp(dist.irecv, buf, global_peer, self.axis.group, tag))
                kept.append((tag, buf, what))
        try:
            works = dist.batch_isend_irecv(ops)
        except RuntimeError as e:
            raise P2PError(f"posting {[k[2] for k in kept]} failed: {e}") from e
        for work, (key, tensor, what) in zip(works, kept):
            if key == "send":
                self._sends.append((work, tensor, what))
            else:
                self._recvs[key] = (work, tensor, what)

    def _wait(self, work: Any, what: str) -> None:
        try:
            ok = work.wait(self.timeout) if self._host_wait else work.wait()
        except RuntimeError as e:
            raise P2PError(f"{what} failed (is the peer alive?): {e}") from e
        if ok is False:
            raise P2PError(f"{what} did not complete within {self.timeout.total_seconds():g}s "
                           f"(a peer died or hangs)")

    def wait_recv(self, tag: int) -> torch.Tensor:
        work, buf, what = self._recvs.pop(tag)
        self._wait(work, what)
        return buf

    def wait_sends(self) -> None:
        for work, _, what in self._sends:
            self._wait(work, what)
        self._sends.clear()
        if self._recvs:
            raise P2PError(f"received but never consumed: {[w for _, _, w in self._recvs.values()]}")
