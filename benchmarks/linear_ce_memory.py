"""Peak memory of the loss step (head matmul + cross-entropy, forward and backward) fused
(kernels/linear_ce.py, chunk by chunk over tokens) against unfused (F.linear, then F.cross_entropy
of the whole [tokens, vocab] logits), at Llama 3's vocabulary, on CPU.

    .venv/bin/python benchmarks/linear_ce_memory.py                      # 4096 tokens, h 512, V 128256
    .venv/bin/python benchmarks/linear_ce_memory.py --tokens 2048 --width 1024 --dtype bf16

Each variant runs in its own child process (peak RSS is per process and never goes down): the
child builds x [tokens, h], the head weight [V, h] and the targets (1% ignored), records its
resident set, runs one loss step (forward, backward with the gradients of x and the weight), and
reports its peak resident set (ru_maxrss) above that baseline: what the step allocated at its
peak, the gradients dX and dW included (both variants produce them). Large tensors are mmap'd by
the allocator and returned on free, so RSS follows torch's CPU allocations. The parent prints
both rows, the ratio, and the loss of each (equal to fp32 rounding; tests/kernels/
test_linear_ce.py checks the gradients).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

DTYPES = ("fp32", "bf16")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def child(variant: str, tokens: int, width: int, vocab: int, dtype_name: str, chunk: int | None) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import torch

    import kernels
    from kernels.linear_ce import linear_cross_entropy_reference
    from perfmodel.memory import loss_chunk_tokens
    from parallel.loss_mask import IGNORE_INDEX

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, width, generator=g).to(dtype).requires_grad_()  # [N, h]
    w = (torch.randn(vocab, width, generator=g) / width ** 0.5).to(dtype).requires_grad_()  # [V, h]
    t = torch.randint(0, vocab, (tokens,), generator=g)  # [N]
    t[:: 100] = IGNORE_INDEX
    base = rss_bytes()
    start = time.perf_counter()
    if variant == "fused":
        loss = kernels.linear_cross_entropy(x, w, t, "torch", chunk)
    else:
        loss = linear_cross_entropy_reference(x, w, t)
    loss.backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {"variant": variant, "peak_above_inputs": peak - base, "seconds": seconds, "loss": loss.item(),
            "chunk": (chunk or loss_chunk_tokens(tokens, width, vocab)) if variant == "fused" else tokens}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--dtype", choices=DTYPES, default="fp32")
    ap.add_argument("--chunk", type=int, default=None,
                    help="tokens per chunk (default: perfmodel/memory.py loss_chunk_tokens)")
    ap.add_argument("--child", choices=("fused", "unfused"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.tokens, a.width, a.vocab, a.dtype, a.chunk)))
        return
    rows = {}
    for variant in ("unfused", "fused"):
        cmd = [sys.executable, __file__, "--child", variant, "--tokens", str(a.tokens), "--width", str(a.width),
               "--vocab", str(a.vocab), "--dtype", a.dtype] + (["--chunk", str(a.chunk)] if a.chunk else [])
        rows[variant] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    item = 2 if a.dtype == "bf16" else 4
    print(f"tokens {a.tokens}, width {a.width}, vocab {a.vocab}, {a.dtype}; whole logits "
          f"{a.tokens * a.vocab * item / 2 ** 20:.1f} MiB, dW {a.vocab * a.width * item / 2 ** 20:.1f} MiB")
    print("| variant | tokens per chunk | peak above inputs MiB | step s | loss |")
    print("|---|---|---|---|---|")
    for r in rows.values():
        print(f"| {r['variant']} | {r['chunk']} | {r['peak_above_inputs'] / 2 ** 20:.1f} | {r['seconds']:.2f} "
              f"| {r['loss']:.6f} |")
    u, f = rows["unfused"], rows["fused"]
    print(f"fused / unfused peak: {f['peak_above_inputs'] / u['peak_above_inputs']:.3f} "
          f"({u['peak_above_inputs'] / f['peak_above_inputs']:.1f}x less); "
          f"loss rel diff {abs(f['loss'] - u['loss']) / abs(u['loss']):.2e}; time fused / unfused "
          f"{f['seconds'] / u['seconds']:.2f}")


if __name__ == "__main__":
    main()
