"""Ring attention's memory with the block math on the PyTorch reference (query tiles of Q_TILE
rows, fp32 score tiles) against the flash-attention Triton kernel that returns the log-sum-exp
(kernels/flash_attention.py), on CPU, one rank.

    .venv/bin/python benchmarks/ring_attention_memory.py                    # Llama-8B heads (GQA 4, hd 128), 8 of 32
    .venv/bin/python benchmarks/ring_attention_memory.py --seq 256 --cp 1

For each cp (1: the whole sequence, one causal block; 2: rank 0 of the zig-zag ring, whose
second step attends the back-half queries to the other rank's K/V, through the local stand-in
ring of benchmarks/cp_memory.py: exchange returns a copy, shapes as the real ring's) and each
block math (`kind` torch | triton), `RingAttention` runs forward and backward on random q, k, v
of the local shard [B, S/cp, H, hd]:

- saved: the bytes autograd keeps for backward (saved-tensor hooks, each storage once); a
  third row differentiates the reference's tiled block math with autograd instead (what the
  block would save without a log-sum-exp-based backward: the probabilities, O(S^2)).
- peak: the most bytes live at once in storages that torch ops created inside the forward (or
  the backward), tracked by a dispatch mode (each new storage counted when created, subtracted
  when freed); "transient" is that peak minus what the region hands on (forward: the saved
  tensors, the output among them; backward: dq, dk, dv). Under TRITON_INTERPRET the kernel runs
  in numpy: the interpreter's numpy copies of the arguments are not torch allocations and are not
  counted (a GPU kernel makes none); the kernel's own torch allocations (out, lse, dq, dkv) are.
  (The interpreter also keeps its last launch's arguments alive until the next launch, which is
  why "transient" is taken against what is handed on, not against what is live at the end.)

The interpreter runs each kernel program in Python, slowly: the default shape (S 512, 8 query
heads, 2 kv heads, hd 128) takes minutes; the memory counts do not depend on speed.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
import weakref
from pathlib import Path
from typing import Any

os.environ.setdefault("TRITON_INTERPRET", "1")  # CPU tensors: Triton's interpreter, read when Triton loads
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks.cp_memory

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402  torch's documented home of dispatch modes

from benchmarks.cp_memory import LocalRing  # noqa: E402
from kernels import flash_attention  # noqa: E402
from parallel.recompute import new_storages  # noqa: E402
from parallel.ring_attention import Ring, RingAttention  # noqa: E402

MIB = 2 ** 20


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages torch ops create while active: live now and at the peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self.seen: set[int] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for storage in new_storages(args, kwargs, out):
            key = id(storage)  # torch keeps one Python object per live storage
            if key in self.seen:
                continue
            self.seen.add(key)
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._freed, key, storage.nbytes())
        return out

    def _freed(self, key: int, n: int) -> None:
        self.live -= n
        self.seen.discard(key)


def saved_storages(fn: Any) -> tuple[Any, int]:
    """fn() under saved-tensor hooks -> (its result, bytes saved for backward, each storage once)."""
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[id(t.untyped_storage())] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(saved.values())


def measure(kind: str, cp: int, batch: int, seq: int, hq: int, hkv: int, hd: int, dtype: torch.dtype) -> dict:
    """RingAttention forward + backward on rank 0's shard with the block math of `kind`."""
    g = torch.Generator().manual_seed(0)
    s = seq // cp
    q = torch.randn(batch, s, hq, hd, generator=g).to(dtype).requires_grad_()  # [B, S/cp, Hq, hd]
    k, v = (torch.randn(batch, s, hkv, hd, generator=g).to(dtype).requires_grad_() for _ in range(2))
    dout = torch.randn(batch, s, hq, hd, generator=g).to(dtype)
    ring = Ring(1, 0, (0,), None) if cp == 1 else LocalRing(cp, 0)
    start = time.perf_counter()
    with LiveBytes() as fwd:
        y, saved = saved_storages(lambda: RingAttention.apply(q, k, v, ring, None, kind))  # y is saved too
    with LiveBytes() as bwd:
        y.backward(dout)
    grads = [t.grad for t in (q, k, v)]
    kept = sum(t.untyped_storage().nbytes() for t in grads)
    return {"saved": saved, "fwd_peak": fwd.peak, "fwd_transient": fwd.peak - saved, "bwd_peak": bwd.peak,
            "bwd_transient": bwd.peak - kept, "seconds": time.perf_counter() - start, "y": y.detach(), "grads": grads}


def autograd_saved(batch: int, seq: int, hq: int, hkv: int, hd: int, dtype: torch.dtype) -> int:
    """Bytes autograd would save differentiating the reference's block math of one causal block
    (cp=1) directly: the tiles' scores and probabilities, no log-sum-exp backward."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(batch, hkv, hq // hkv, seq, hd, generator=g).to(dtype).requires_grad_()  # [B, Hkv, rep, S, hd]
    kv = torch.randn(2, batch, hkv, seq, hd, generator=g).to(dtype).requires_grad_()  # [2, B, Hkv, S, hd]
    _, saved = saved_storages(lambda: flash_attention.block_reference(q, kv, True, 1 / math.sqrt(hd)))
    return saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--cp", default="1,2", help="comma-separated cp degrees (rank 0 of each)")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    a = ap.parse_args()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    shape = (a.batch, a.seq, a.heads, a.kv_heads, a.head_dim)
    print(f"B {a.batch}, S {a.seq}, Hq {a.heads}, Hkv {a.kv_heads}, hd {a.head_dim}, {a.dtype}, "
          f"Q_TILE {flash_attention.Q_TILE}, TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')}")
    print("\n| cp | block math | saved MiB | fwd peak MiB | fwd transient MiB | bwd peak MiB | bwd transient MiB | s |")
    print("|---|---|---|---|---|---|---|---|")
    ratios = []
    for cp in (int(c) for c in a.cp.split(",")):
        if a.seq % (2 * cp):
            raise SystemExit(f"--seq {a.seq} must be divisible by 2 * cp = {2 * cp}; change --seq or --cp")
        rows = {kind: measure(kind, cp, a.batch, a.seq, *shape[2:], dtype) for kind in ("torch", "triton")}
        for kind, r in rows.items():
            print(f"| {cp} | {kind} | {r['saved'] / MIB:.2f} | {r['fwd_peak'] / MIB:.2f} | "
                  f"{r['fwd_transient'] / MIB:.2f} | {r['bwd_peak'] / MIB:.2f} | {r['bwd_transient'] / MIB:.2f} | "
                  f"{r['seconds']:.1f} |")
        t, f = rows["torch"], rows["triton"]
        err = max(((x.float() - y.float()).abs().max() / y.float().abs().max()).item()
                  for x, y in zip([f["y"], *f["grads"]], [t["y"], *t["grads"]]))
        ratios.append((cp, {m: f[m] / t[m] for m in ("saved", "fwd_peak", "fwd_transient", "bwd_peak",
                                                      "bwd_transient")}, err))
    if "1" in a.cp.split(","):
        print(f"| 1 | autograd through the reference (no lse backward) | "
              f"{autograd_saved(a.batch, a.seq, *shape[2:], dtype) / MIB:.2f} | | | | | |")
    print("\ntriton / torch:\n\n| cp | saved | fwd peak | fwd transient | bwd peak | bwd transient | max rel diff |")
    print("|---|---|---|---|---|---|---|")
    for cp, r, err in ratios:
        print(f"| {cp} | " + " | ".join(f"{v:.3f}" for v in r.values()) + f" | {err:.1e} |")


if __name__ == "__main__":
    main()
