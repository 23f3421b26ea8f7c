"""Context parallelism: activation memory per rank vs sequence length, the longest sequence that
fits a per-rank budget, and how much ring communication hides behind the attention math.

    .venv/bin/python benchmarks/cp_memory.py                  # both parts (minutes; the memory part is meta-device only)
    .venv/bin/python benchmarks/cp_memory.py --part memory    # memory only (no processes)
    .venv/bin/python benchmarks/cp_memory.py --part overlap --cp 2 --seq 4096

Memory (one process, no compute): the bytes autograd saves for backward in one microbatch's
forward, counted with saved-tensor hooks (each storage once, parameters excluded), on the meta
device (shapes, no data) as seen by cp rank 0 (every rank has the same shapes). The ring is a
local stand-in with the real one's shapes; cp=1 runs the same ring-attention core (one block),
so the columns compare like with like. Not counted: transients freed within an op (the fp32
score tile is Q_TILE x S/cp per head) and the ring's receive buffers (one K/V block forward;
one K/V block and one fp32 dK/dV accumulator backward), both also O(S/cp). The budget table is
the longest sequence (a multiple of 256 * 2cp) whose saved activations fit `--budget-gib`.

Overlap (cp gloo processes on 127.0.0.1, one thread each): ring attention forward + backward
on random data, median of `--trials` after one warm-up, timed three ways in the same process:
  full      the real ring: exchanges overlapped with the block math
  compute   the same math with the local stand-in ring (no communication)
  comm      the same messages (forward K/V, backward K/V + dK/dV accumulators) exchanged
            back to back, each waited at once, no math
hidden = (compute + comm - full) / comm, clipped to [0, 1]: the fraction of communication time
that did not add to the step. On a 2-core machine the ranks share cores with gloo's threads,
so this is a lower bound of what separate devices would show.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from axon.model import build
from kernels import flash_attention
from launch.local import free_port, init_local
from parallel.context import RingCore, zigzag_positions
from parallel.ring_attention import Ring, RingAttention
from perfmodel.specs import ModelSpec

GIB = 2**30


class LocalRing(Ring):
    """A ring position with no neighbours: exchange hands back a copy of what was sent (the
    receive buffer the real ring would allocate), so shapes and math match the real ring."""

    def __init__(self, size: int, coord: int):
        self.size, self.coord, self.group = size, coord, None

    def exchange(self, send: torch.Tensor) -> tuple[torch.Tensor, list]:
        return send.clone(), []


# ---------------------------------------------------------------------------------- memory
def saved_bytes(spec: ModelSpec, cp: int, seq: int, batch: int, dtype: torch.dtype) -> int:
    """Bytes autograd saves for backward in one microbatch's forward on cp rank 0 (meta device:
    shapes only, no compute), parameters excluded, each storage counted once."""
    model = build(spec).to(dtype)
    for layer in model.layers.values():
        layer.attn.core = RingCore(LocalRing(cp, 0))
    params = {id(p.untyped_storage()) for p in model.parameters()}
    positions = zigzag_positions(seq, cp, 0).to("meta")
    tokens = torch.zeros(batch, seq // cp, dtype=torch.long, device="meta")
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = id(t.untyped_storage())  # one Python object per live storage
        if key not in params:
            saved[key] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(tokens, positions)  # [b, S/cp, V]
        F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten(), reduction="sum")
    return sum(saved.values())


def _longest_fitting(spec: ModelSpec, cp: int, batch: int, dtype: torch.dtype, budget: float) -> int:
    """Longest sequence (a multiple of 256 * 2cp) whose saved activations fit `budget` bytes.
    They are affine in the sequence length (no S^2 term is saved), so two measurements place
    the answer and two more confirm it: it fits and one step more does not."""
    step = 256 * 2 * cp
    s1, s2 = 4 * step, 8 * step
    b1, b2 = (saved_bytes(spec, cp, s, batch, dtype) for s in (s1, s2))
    per_token = (b2 - b1) / (s2 - s1)
    best = int((budget - b1) / per_token + s1) // step * step
    if not saved_bytes(spec, cp, best, batch, dtype) <= budget < saved_bytes(spec, cp, best + step, batch, dtype):
        raise RuntimeError(f"saved activations are not affine in the sequence length at cp={cp}")
    return best


def memory_table(spec: ModelSpec, seqs: list[int], cps: list[int], batch: int, dtype: torch.dtype,
                 budget_gib: float) -> str:
    lines = [f"model: {spec}", f"microbatch {batch}, {dtype}, Q_TILE={flash_attention.Q_TILE}", "",
             "| seq | " + " | ".join(f"cp={c} MiB (vs cp=1)" for c in cps) + " |",
             "|---:|" + "---:|" * len(cps)]
    for seq in seqs:
        sizes = [saved_bytes(spec, cp, seq, batch, dtype) for cp in cps]
        lines.append(f"| {seq} | " + " | ".join(f"{b / 2**20:.1f} ({b / sizes[0]:.2f}x)" for b in sizes) + " |")
    lines += ["", f"longest sequence whose saved activations fit {budget_gib} GiB per rank:", "",
              "| cp | longest seq | vs cp=1 |", "|---:|---:|---:|"]
    first = None
    for cp in cps:
        s = _longest_fitting(spec, cp, batch, dtype, budget_gib * GIB)
        first = first or s
        lines.append(f"| {cp} | {s} | {s / first:.2f}x |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------- overlap
def _median_time(fn, trials: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(trials):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _overlap_worker(rank: int, cp: int, port: int, seq: int, heads: int, head_dim: int, trials: int,
                    results: "mp.Queue") -> None:
    init_local(rank, cp, port, timeout_s=300)
    ring, local = Ring(cp, rank, tuple(range(cp)), None), LocalRing(cp, rank)
    g = torch.Generator().manual_seed(rank)
    q, k, v, dout = (torch.randn(1, seq // cp, heads, head_dim, generator=g) for _ in range(4))

    def attention(r: Ring) -> None:
        qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
        RingAttention.apply(qs, ks, vs, r).backward(dout)

    kv = torch.randn(2, 1, heads, seq // cp, head_dim)
    acc = torch.randn(kv.shape)

    def messages() -> None:  # forward: cp-1 K/V hops; backward: cp-1 K/V hops + cp accumulator hops
        for buf, hops in ((kv, cp - 1), (kv, cp - 1), (acc, cp)):
            for _ in range(hops):
                _, reqs = ring.exchange(buf)
                for req in reqs:
                    req.wait()

    t = {name: _median_time(fn, trials) for name, fn in
         (("full", lambda: attention(ring)), ("compute", lambda: attention(local)), ("comm", messages))}
    gathered = [None] * cp
    dist.all_gather_object(gathered, t)
    if rank == 0:
        results.put({name: max(r[name] for r in gathered) for name in t})  # the slowest rank sets the pace
    dist.destroy_process_group()


def overlap_row(cp: int, seq: int, heads: int, head_dim: int, trials: int) -> str:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_overlap_worker, args=(r, cp, port, seq, heads, head_dim, trials, results))
             for r in range(cp)]
    for p in procs:
        p.start()
    t = results.get(timeout=1800)
    for p in procs:
        p.join()
    hidden = min(1.0, max(0.0, (t["compute"] + t["comm"] - t["full"]) / t["comm"]))
    mib = 2 * seq // cp * heads * head_dim * 4 / 2**20
    return (f"| {cp} | {seq} | {heads}x{head_dim} | {mib:.1f} | {t['full'] * 1e3:.0f} | "
            f"{t['compute'] * 1e3:.0f} | {t['comm'] * 1e3:.0f} | {hidden:.2f} |")


OVERLAP_HEADER = ("| cp | seq | heads x hd | K/V message MiB | full ms | compute ms | comm ms | hidden |\n"
                  "|---:|---:|---|---:|---:|---:|---:|---:|")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", choices=("memory", "overlap", "all"), default="all")
    ap.add_argument("--seqs", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    ap.add_argument("--cps", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--budget-gib", type=float, default=4.0)
    ap.add_argument("--cp", type=int, nargs="+", default=[2, 4], help="cp degrees for the overlap part")
    ap.add_argument("--seq", type=int, nargs="+", default=[2048, 4096], help="sequences for the overlap part")
    ap.add_argument("--trials", type=int, default=3)
    args = ap.parse_args()
    if args.part in ("memory", "all"):
        spec = ModelSpec(n_layers=4, d_model=1024, n_heads=16, n_kv_heads=4, d_ff=2816, vocab_size=32000,
                         max_seq_len=1 << 20)
        print(memory_table(spec, args.seqs, args.cps, 1, torch.bfloat16, args.budget_gib), flush=True)
    if args.part in ("overlap", "all"):
        print("\n" + OVERLAP_HEADER, flush=True)
        for cp in args.cp:
            for seq in args.seq:
                print(overlap_row(cp, seq, 8, 64, args.trials), flush=True)


if __name__ == "__main__":
    main()
