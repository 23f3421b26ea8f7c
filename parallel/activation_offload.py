"""PipeOffload: the activations autograd saves during a (chunk, microbatch)'s forward, tracked
and optionally moved to host memory until its backward.

    store = ActivationStore(device, params)
    with store.saving((chunk, mb)): out = chunk(x)      # saved-tensor hooks record what is kept
    store.offload((chunk, mb))   # after F: device -> host
    store.reload((chunk, mb))    # a few actions before B: host -> device (asynchronous on GPU)
    out.backward(g); store.release((chunk, mb))

Every saved tensor other than a weight (the `params` given: the parameters and, under mixed
precision, their compute tensors, parallel/precision.py) is wrapped in a `_View` of a `_Saved`
storage: tensors saved as several views of one storage (an attention output saved by the core
and, reshaped, by the output projection) share one `_Saved`, whose bytes count once as device
activation memory from F until `release` (after B, or after W when the backward is split, where
`hold` adds the tensors W keeps) and which moves to the host and back once, the views rebuilt on
it after a reload. Offloaded bytes count on the host; the peaks of both are the measured
activation memory (`stats()`). On a GPU the copies
run on a separate stream from pinned host buffers, ordered by events: an offload waits for the
forward that produced the data; a reload is waited for (by the compute stream) only when backward
unpacks the tensor. On the CPU the same logic runs with synchronous copies into separate host
tensors.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch

Key = tuple[int, int]  # (chunk, microbatch)


class _Saved:
    """One saved storage: `base` (uint8 [nbytes] over the whole storage) on the device, or its host
    copy while offloaded; `views` are the saved tensors on it."""

    __slots__ = ("base", "host", "event", "nbytes", "views")

    def __init__(self, t: torch.Tensor):
        self.base: torch.Tensor | None = torch.empty(0, dtype=torch.uint8, device=t.device).set_(t.untyped_storage())
        self.host: torch.Tensor | None = None
        self.event: Any = None  # GPU: copy finished (offload or reload)
        self.nbytes = self.base.numel()
        self.views: list[_View] = []


class _View:
    """One saved tensor: the tensor itself while its storage is on the device, else how to rebuild it."""

    __slots__ = ("saved", "tensor", "dtype", "shape", "stride", "offset")

    def __init__(self, saved: _Saved, t: torch.Tensor):
        self.saved, self.tensor = saved, t
        self.dtype, self.shape, self.stride, self.offset = t.dtype, t.shape, t.stride(), t.storage_offset()
        saved.views.append(self)

    def get(self) -> torch.Tensor:
        """The saved tensor (a view rebuilt on the reloaded storage after an offload)."""
        if self.tensor is None:
            base = self.saved.base
            self.tensor = torch.empty(0, dtype=self.dtype, device=base.device).set_(
                base.untyped_storage(), self.offset, self.shape, self.stride)
        return self.tensor


@dataclass
class MemoryStats:
    peak_device_bytes: int = 0  # saved activations on the device (hooks + W stash)
    peak_host_bytes: int = 0  # offloaded activations in host memory
    offloaded_bytes: int = 0  # total moved to host this step


class ActivationStore:
    def __init__(self, device: torch.device, params: list[torch.Tensor]):
        self.device = device
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        # parameters are recognized by their storage object, which survives ZeRO-3 freeing and
        # regathering it (resize in place: the address changes, the storage does not; torch keeps
        # one Python object per live storage, so its id() is its identity)
        self._param_storages = {id(p.untyped_storage()) for p in params}
        self._entries: dict[Key, list[_Saved]] = {}
        self._extra: dict[Key, int] = {}  # bytes kept for W (input, output grad) after B
        self.device_bytes = self.host_bytes = 0
        self.stats = MemoryStats()

    def reset_stats(self) -> MemoryStats:
        old, self.stats = self.stats, MemoryStats(self.device_bytes, self.host_bytes)
        return old

    def _note(self) -> None:
        self.stats.peak_device_bytes = max(self.stats.peak_device_bytes, self.device_bytes)
        self.stats.peak_host_bytes = max(self.stats.peak_host_bytes, self.host_bytes)

    @contextmanager
    def saving(self, key: Key) -> Iterator[None]:
        """Track what autograd saves for `key` while the block runs (its forward)."""
        entries = self._entries.setdefault(key, [])
        storages: dict[int, _Saved] = {}  # by the storage's address: live storages do not share one
        seen: dict[tuple, _View] = {}

        def pack(t: torch.Tensor) -> Any:
            # weights (and views of them) are not activations; tensors off the device stay as they are
            storage = t.untyped_storage()
            if t.device.type != self.device.type or id(storage) in self._param_storages:
                return t
            sig = (t.data_ptr(), t.dtype, tuple(t.shape), t.stride(), t.storage_offset())
            if sig in seen:  # the same tensor saved by two ops is held once
                return seen[sig]
            saved = storages.get(storage.data_ptr())
            if saved is None:  # a new storage: its bytes are held from now on
                saved = storages[storage.data_ptr()] = _Saved(t)
                entries.append(saved)
                self.device_bytes += saved.nbytes
                self._note()
            view = seen[sig] = _View(saved, t)
            return view

        def unpack(v: Any) -> torch.Tensor:
            if not isinstance(v, _View):
                return v
            s = v.saved
            if s.base is None:  # no RELOAD was scheduled in time: bring it back now
                self._reload_one(s)
            if s.event is not None:
                torch.cuda.current_stream(self.device).wait_event(s.event)
                s.base.record_stream(torch.cuda.current_stream(self.device))
                s.event = None
            return v.get()

        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield

    def offload(self, key: Key) -> None:
        """Move `key`'s saved activations to host memory (after its forward)."""
        if self.cuda:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
        for s in self._entries.get(key, []):
            if s.base is None:
                continue
            if self.cuda:
                with torch.cuda.stream(self.stream):
                    s.host = torch.empty(s.nbytes, dtype=torch.uint8, pin_memory=True)  # [nbytes]
                    s.host.copy_(s.base, non_blocking=True)
                    s.base.record_stream(self.stream)  # the allocator reuses it after the copy
            else:
                s.host = s.base.clone()  # [nbytes], a separate host buffer
            s.base, s.event = None, None
            for v in s.views:  # the device storage is freed once nothing else holds it
                v.tensor = None
            self.device_bytes -= s.nbytes
            self.host_bytes += s.nbytes
            self.stats.offloaded_bytes += s.nbytes
        self._note()

    def _reload_one(self, s: _Saved) -> None:
        if self.cuda:
            with torch.cuda.stream(self.stream):
                s.base = s.host.to(self.device, non_blocking=True)
                s.event = torch.cuda.Event()
                s.event.record(self.stream)
        else:
            s.base = s.host.clone()
        s.host = None
        self.device_bytes += s.nbytes
        self.host_bytes -= s.nbytes
        self._note()

    def reload(self, key: Key) -> None:
        """Start bringing `key`'s activations back (ahead of its backward)."""
        for s in self._entries.get(key, []):
            if s.base is None:
                self._reload_one(s)

    def note_transient(self, nbytes: int) -> None:
        """Count `nbytes` that exist briefly on top of what is held now (a Block rematerialized
        inside backward under full recomputation) toward the peak."""
        self.stats.peak_device_bytes = max(self.stats.peak_device_bytes, self.device_bytes + nbytes)

    def hold(self, key: Key, tensors: list[torch.Tensor]) -> None:
        """Count tensors kept after B for the deferred weight gradients (W) of `key`."""
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        self._extra[key] = self._extra.get(key, 0) + nbytes
        self.device_bytes += nbytes
        self._note()

    def release(self, key: Key, saved: bool = True, held: bool = True) -> None:
        """Forget `key`'s saved activations (after B) and/or the W stash (after W)."""
        if saved:
            for s in self._entries.pop(key, []):
                if s.base is not None:
                    self.device_bytes -= s.nbytes
                else:
                    self.host_bytes -= s.nbytes
                s.base = s.host = None
                s.views.clear()
        if held:
            self.device_bytes -= self._extra.pop(key, 0)
