"""Calibrate the performance model on this machine (`axon tune --calibrate`).

Starts `ranks` local processes on gloo (127.0.0.1) and measures, while all ranks run at once:
- the fp32 GEMM rate per rank at two sizes (giving peak_flops);
- the forward + backward time of a transformer Block of the configured model, and of one twice as
  wide, at two batch sizes each (`block_law_fit`: compute_efficiency, how far below the GEMM rate
  a whole Block runs: norms, RoPE, softmax, elementwise ops and autograd; gemm_half_dim, how that
  rate falls with the Block's smallest dimension: per token the elementwise work grows with
  d_model, the GEMMs' with its square, so a narrower Block spends a larger share outside GEMMs
  (one width alone priced a Block twice as wide ~20% too slow); and block_overhead_s, a fixed
  cost per Block pass);
- the memory copy rate;
- the time of all-reduce, all-gather and reduce-scatter for each group size 2, 4, ... ranks over
  a few message sizes.

Collectives are timed as training sees them: every rank is in a group of that size, all groups
run at once, and each call follows a short GEMM; the time a call adds to the GEMM loop is its
cost. When there are more ranks than cores this includes waiting for a descheduled peer, which
dominates small messages (an idle-machine ping-pong would under-state it several times). alpha
and beta are fitted by least squares to the ring formulas (docs/architecture.md, Formulas), per collective
and group size (recorded as comments) and jointly (the values the model uses). Writes
configs/cluster/local-cpu.yaml. Takes about a minute on an idle machine; longer when the cores
are busy.
"""
from __future__ import annotations

import os
import resource
import statistics
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from axon.model import Block, rope_tables
from launch.local import spawn
from perfmodel.block_cost import block_compute
from perfmodel.specs import Cluster, ModelSpec, Plan

OUT = Path(__file__).resolve().parent.parent / "configs" / "cluster" / "local-cpu.yaml"
SIZES = (4 * 1024, 1024 * 1024, 4 * 1024 * 1024)  # bytes per collective (fp32 elements x 4)
GEMM_DIMS = (128, 512)
GEMM_REPEATS = 5
REPEATS = 3
BLOCK_BATCHES, BLOCK_CALLS = (1, 4), 3  # sequences per timed Block call, calls per sample
BLOCK_WIDTHS = (1, 2)  # the configured Block and one this many times as wide (heads too: same head size)
LOAD_DIM, LOAD_CALLS = 256, 8  # GEMM before each timed collective call (~10 ms with every rank busy), calls per sample


def _timed(fn, repeats: int = REPEATS) -> float:
    """Median seconds of fn() after one warm-up, the ranks synchronised by a barrier before each."""
    fn()
    times = []
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _gemm_rates() -> dict[int, float]:
    """fp32 GEMM FLOP/s per size in GEMM_DIMS, every rank busy; the sizes alternate over the
    repeats (median kept) so a burst of outside load does not land on one size only."""
    mats = {n: (torch.randn(n, n), torch.randn(n, n)) for n in GEMM_DIMS}
    reps = {n: max(1, int(2e9 // (2 * n**3))) for n in GEMM_DIMS}  # ~1 s each: every rank busy throughout
    times: dict[int, list[float]] = {n: [] for n in GEMM_DIMS}
    for i in range(GEMM_REPEATS + 1):  # the first round warms up
        for n, (a, b) in mats.items():
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(reps[n]):
                a @ b
            if i:
                times[n].append(time.perf_counter() - t0)
    return {n: 2 * n**3 * reps[n] / statistics.median(times[n]) for n in GEMM_DIMS}


def widened(spec: ModelSpec, k: int) -> ModelSpec:
    """`spec` k times as wide: d_model, d_ff and the head counts (the head size stays)."""
    return replace(spec, d_model=spec.d_model * k, d_ff=spec.d_ff * k, n_heads=spec.n_heads * k,
                   n_kv_heads=spec.n_kv_heads * k)


def _block_times(spec: ModelSpec, seq: int) -> dict[tuple[int, int], float]:
    """Seconds of one forward + backward of a transformer Block of `widened(spec, k)` on b x `seq`
    tokens, by (k, b) for each k in BLOCK_WIDTHS and b in BLOCK_BATCHES, every rank busy (median of
    5; the shapes alternate)."""
    blocks, xs = {}, {}
    for k in BLOCK_WIDTHS:
        wide = widened(spec, k)
        blocks[k] = (Block(wide), rope_tables(torch.arange(seq), wide) if wide.pos == "rope" else None)  # default init
        xs.update({(k, b): torch.randn(b, seq, wide.d_model, requires_grad=True) for b in BLOCK_BATCHES})  # [b, S, h]
    times: dict[tuple[int, int], list[float]] = {key: [] for key in xs}
    for i in range(6):  # the first round warms up
        for (k, b), x in xs.items():
            block, rope = blocks[k]
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(BLOCK_CALLS):
                block(x, rope).sum().backward()
            if i:
                times[(k, b)].append((time.perf_counter() - t0) / BLOCK_CALLS)
    return {key: statistics.median(ts) for key, ts in times.items()}


def block_fit(spec: ModelSpec, seq: int, block_s: dict[int, float], peak: float, half: float
              ) -> tuple[float, float]:
    """(compute_efficiency, block_overhead_s) from Block times at two batch sizes: the time is
    t(b) = overhead + ideal(b) / efficiency, where ideal(b) is the forward + backward the model
    predicts at efficiency 1 (3x the forward GEMMs and attention core,
    perfmodel.block_cost.block_compute)."""
    ideal = Cluster(peak_flops=peak, gemm_half_dim=half, compute_efficiency=1.0)
    (b1, t1), (b2, t2) = sorted(block_s.items())
    i1, i2 = (3 * (bc.gemm + bc.attn) for bc in
              (block_compute(spec, Plan(micro_batch_size=b), ideal, seq) for b in (b1, b2)))
    inv_eff = (t2 - t1) / (i2 - i1)
    overhead = t1 - i1 * inv_eff
    if inv_eff <= 1.0 or overhead < 0:  # too noisy to separate the terms (or above the GEMM rate): rate only
        return min(1.0, i2 / t2), 0.0
    return 1.0 / inv_eff, overhead


def block_law_fit(samples: list[tuple[ModelSpec, int, float]], seq: int, peak: float
                  ) -> Optional[tuple[float, float, float]]:
    """(compute_efficiency, block_overhead_s, gemm_half_dim) from Block times (spec, sequences,
    seconds) of at least two widths: the model's law (perfmodel/block_cost.py block_compute), t =
    overhead + ideal / efficiency * (s + half) / s, with ideal the forward + backward at the GEMM
    peak (3x the forward GEMMs and attention core) and s the smallest of the Block's tokens and
    d_model, is linear in (overhead, 1 / efficiency, half / efficiency): least squares on the
    relative error. None when noise makes a term negative or the rate exceeds the GEMM peak."""
    ideal = Cluster(peak_flops=peak, gemm_half_dim=0.0, compute_efficiency=1.0)
    rows, targets = [], []
    for spec, b, t in samples:
        bc = block_compute(spec, Plan(micro_batch_size=b), ideal, seq)
        x = 3 * (bc.gemm + bc.attn)
        rows.append([1.0 / t, x / t, x / min(b * seq, spec.d_model) / t])  # each row divided by t: relative error
        targets.append([1.0])
    sol = torch.linalg.lstsq(torch.tensor(rows, dtype=torch.float64), torch.tensor(targets, dtype=torch.float64))
    overhead, inv_eff, half_over_eff = sol.solution.flatten().tolist()
    if overhead < 0 or inv_eff < 1.0 or half_over_eff < 0:
        return None
    return 1.0 / inv_eff, overhead, half_over_eff / inv_eff


def _p2p_time(peer: int, size: int, a: torch.Tensor, base: float) -> float:
    """Seconds one isend + irecv exchange of `size` bytes with `peer` adds after a GEMM on `a`
    (what a pipeline or ring-attention hop pays); recorded for reference, not fitted."""
    x, y = torch.ones(size // 4), torch.empty(size // 4)

    def exchange() -> None:
        for req in dist.batch_isend_irecv([dist.P2POp(dist.isend, x, peer), dist.P2POp(dist.irecv, y, peer)]):
            req.wait()

    return max(_timed(lambda: [(a @ a, exchange()) for _ in range(LOAD_CALLS)]) / LOAD_CALLS - base, 0.0)


def _worker(spec: ModelSpec, seq: int) -> dict:
    """This rank's measurements (run by launch.local.spawn on every rank)."""
    warnings.filterwarnings("ignore", category=FutureWarning)  # *_into_tensor names are being renamed
    rank, world = dist.get_rank(), dist.get_world_size()
    out: dict = {"gemm": _gemm_rates(), "block": _block_times(spec, seq)}
    buf = torch.empty(8 * 2**20 // 4)
    out["copy"] = 2 * buf.numel() * 4 / _timed(lambda: buf.clone())
    out["rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    groups, g = {}, 2
    while g <= world:
        if world % g == 0:  # the world splits into groups of g, all timed at once
            for start in range(0, world, g):  # every rank creates every group, same order
                group = dist.new_group(list(range(start, start + g)))
                if start <= rank < start + g:
                    groups[g] = group
        g *= 2
    a = torch.randn(LOAD_DIM, LOAD_DIM)
    base = _timed(lambda: [a @ a for _ in range(LOAD_CALLS)]) / LOAD_CALLS  # the compute between calls
    coll = []
    for g, group in groups.items():
        for size in SIZES:
            n = size // 4
            x, full, shard = torch.ones(n), torch.empty(n), torch.empty(n // g)
            ops = {"all_reduce": lambda: dist.all_reduce(x, group=group),
                   "all_gather": lambda: dist.all_gather_single(full, x[: n // g], group=group),
                   "reduce_scatter": lambda: dist.reduce_scatter_single(shard, x, group=group)}
            for kind, op in ops.items():
                try:
                    t = _timed(lambda: [(a @ a, op()) for _ in range(LOAD_CALLS)]) / LOAD_CALLS - base
                except (RuntimeError, NotImplementedError):
                    t = float("nan")  # this backend lacks the collective
                coll.append((kind, g, size, max(t, 0.0)))
    out["collectives"] = coll
    out["p2p"] = {size: _p2p_time(rank ^ 1, size, a, base) for size in SIZES}  # pairs exchange, all at once
    return out


def _fit(samples: list[tuple[str, int, int, float]]) -> tuple[float, float]:
    """Least-squares (alpha, beta) for t = a_coef * alpha + b_coef * S / beta over the samples."""
    rows = []
    for kind, g, size, t in samples:
        if t != t:  # nan: not measured
            continue
        scale = 2 if kind == "all_reduce" else 1
        rows.append((scale * (g - 1), scale * (g - 1) / g * size, t))
    saa = sum(a * a for a, _, _ in rows)
    sab = sum(a * b for a, b, _ in rows)
    sbb = sum(b * b for _, b, _ in rows)
    sat = sum(a * t for a, _, t in rows)
    sbt = sum(b * t for _, b, t in rows)
    det = saa * sbb - sab * sab
    alpha = (sat * sbb - sbt * sab) / det
    inv_beta = (saa * sbt - sab * sat) / det
    if inv_beta <= 0:  # timings too noisy to separate the terms: bandwidth from the largest message alone
        a, b, t = max(rows, key=lambda r: r[1])
        inv_beta = t / b
    return max(alpha, 1e-7), 1.0 / inv_beta


def measure(ranks: int, spec: ModelSpec, seq: int) -> dict:
    """Run the workers and gather rank 0's collective timings and every rank's GEMM rate and Block time."""
    results = dict(enumerate(spawn(ranks, _worker, spec, seq)))
    return {"gemm": {n: min(r["gemm"][n] for r in results.values()) for n in GEMM_DIMS},
            "copy": min(r["copy"] for r in results.values()),
            "block": {key: max(r["block"][key] for r in results.values()) for key in results[0]["block"]},
            "rss": max(r["rss"] for r in results.values()),
            "collectives": results[0]["collectives"], "p2p": results[0]["p2p"]}


def calibrate(spec: ModelSpec, seq: int, ranks: int = 8, out: Path = OUT) -> Path:
    """Measure with `ranks` processes (the Block of `spec` at `seq` tokens per sequence) and write `out`."""
    t0 = time.perf_counter()
    m = measure(ranks, spec, seq)
    (n1, n2), (r1, r2) = GEMM_DIMS, (m["gemm"][GEMM_DIMS[0]], m["gemm"][GEMM_DIMS[1]])
    # rate(n) = peak * n / (n + half): two sizes give both unknowns
    ratio = r1 / r2  # = (n1 / (n1 + half)) / (n2 / (n2 + half)), between n1/n2 and 1
    if ratio >= 1:
        half = 0.0
    elif ratio <= n1 / n2:  # small GEMMs slower than the model can express: cap the penalty
        half = float(n2)
    else:
        half = (n1 - ratio * n1) / (ratio - n1 / n2)
    peak = r2 * (n2 + half) / n2
    alpha, beta = _fit(m["collectives"])
    law = block_law_fit([(widened(spec, k), b, t) for (k, b), t in m["block"].items()], seq, peak)
    if law is None:  # too noisy for three terms: the configured width's rate and fixed part, the GEMMs' half
        eff, overhead = block_fit(spec, seq, {b: t for (k, b), t in m["block"].items() if k == 1}, peak, half)
        block_half, how = half, "the GEMMs' half rate: too noisy to fit across the widths"
    else:
        eff, overhead, block_half = law
        how = "fitted on the Blocks"
    lines = [f"# This machine, measured by `axon tune --calibrate` with {ranks} gloo ranks on 127.0.0.1 "
             f"({time.perf_counter() - t0:.1f} s).",
             f"# fp32 GEMM per rank while all ranks run: {r1 / 1e9:.2f} GFLOP/s at n={n1}, {r2 / 1e9:.2f} at n={n2}"
             f" (half rate at n={half:.1f}); copy {m['copy'] / 1e9:.2f} GB/s;"
             f" peak RSS {m['rss'] / 1e6:.0f} MB per rank.",
             *(f"# Block forward + backward (d_model {widened(spec, k).d_model}, d_ff {widened(spec, k).d_ff}),"
               " slowest rank: " +
               ", ".join(f"{b} x {seq} tokens {t * 1e3:.1f} ms" for (kk, b), t in m["block"].items() if kk == k)
               for k in BLOCK_WIDTHS),
             f"# fitted: {overhead * 1e3:.2f} ms fixed + the model's GEMM time / {eff:.2f}, the rate falling as"
             f" s / (s + {block_half:.1f}), s the smaller of tokens and d_model ({how}).",
             "# alpha (us) / beta (GB/s) fitted per collective and group size (ring formulas):"]
    for kind in ("all_reduce", "all_gather", "reduce_scatter"):
        fits = []
        for g in sorted({g for k, g, _, _ in m["collectives"] if k == kind}):
            rows = [s for s in m["collectives"] if s[0] == kind and s[1] == g]
            if all(t == t for *_, t in rows):
                a, b = _fit(rows)
                fits.append(f"G={g}: {a * 1e6:.0f}us/{b / 1e9:.2f}")
            else:
                fits.append(f"G={g}: unsupported")
        lines.append(f"#   {kind}: " + ", ".join(fits))
    for kind, g, size, t in m["collectives"]:
        lines.append(f"#   raw {kind} G={g} {size} B: {t * 1e6:.0f} us")
    lines.append("#   p2p exchange (isend + irecv with one peer): " +
                 ", ".join(f"{size} B: {t * 1e6:.0f} us" for size, t in m["p2p"].items()))
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    lines += ["defaults: [cluster_schema]", "name: local-cpu", "nodes: 1", f"gpus_per_node: {ranks}",
              f"peak_flops: {peak:.4g}", f"hbm_bytes: {total / ranks:.4g}  # RAM shared by the ranks",
              f"host_bytes: {total:.4g}", f"intra_bw: {beta:.4g}", f"inter_bw: {beta:.4g}",
              f"intra_lat: {alpha:.4g}", f"inter_lat: {alpha:.4g}", f"host_bw: {m['copy']:.4g}",
              f"mem_bw: {m['copy']:.4g}", f"compute_efficiency: {eff:.3g}  # a whole Block's rate / the GEMM rate (above)",
              f"block_overhead_s: {overhead:.4g}  # fixed time per Block forward + backward (above)",
              f"gemm_half_dim: {block_half:.4g}  # {how} (above)", "dtype_bytes: 4  # fp32 on CPU",
              f"overhead_bytes: {m['rss']:.4g}  # a rank's resident size after init and these tests",
              f"compute_units: {len(os.sched_getaffinity(0))}  # cores the ranks share",
              f"measured_ranks: {ranks}  # ranks sharing them while measured (Cluster.sharing rescales)"]
    out.write_text("\n".join(lines) + "\n")
    return out
