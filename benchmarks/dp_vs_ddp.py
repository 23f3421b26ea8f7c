"""Our data parallelism (`parallel.data.DataParallel`) against PyTorch DDP, in one run.

    .venv/bin/python benchmarks/dp_vs_ddp.py                       # 4 and 8 ranks, a few minutes
    .venv/bin/python benchmarks/dp_vs_ddp.py --ranks 4 --trials 6  # quicker look

For each world size the script spawns that many gloo ranks on 127.0.0.1 (one CPU thread each).
Every rank builds the same model (same seed) once per variant:

    ours b=B       DataParallel, buckets of B MiB, all-reduce launched during backward
    ddp b=B        DistributedDataParallel(bucket_cap_mb=B), its other settings default; for
                   B = 25 it is DDP's untouched default (bucket_cap_mb=None), which adds a
                   small (~1 MiB) first bucket that an explicit 25 would not
    ours b=B seq   DataParallel(overlap=False): every bucket reduced after backward (control)
    comm b=B       the buckets of `ours b=B` all-reduced with no compute running

A trial runs one training step (forward + backward + gradient reduction + AdamW) of every
variant, in an order rotated each trial so no variant always runs first after the barrier.
Variants see the same batch at the same step, so their losses move in lockstep. Ours sums
gradients (loss / global tokens); DDP averages them (loss / local tokens): the same update.

Reported, as medians over trials after warm-up, with the 25th-75th percentile of the per-trial
values in brackets:
  tok/s            global tokens / step time (the slowest rank's, each step starts at a barrier)
  tok/s ours/ddp   the ratio within one trial (paired: the two ran seconds apart)
  CPU ours/ddp     CPU seconds per step (process time, all threads, mean over ranks): the cost
                   of the step that scheduler noise from other processes hardly touches
  exposed comm     ours: from the moment the last rank enters finish() until all ranks leave it,
                   i.e. the reduction left after every rank's backward is done
  total comm       `comm` of the same buckets in the same trial, measured the same way
  hidden           1 - exposed / total (the overlap-off control should read about 0)
Only ratios within one run are meant to be compared; absolute times move with the load.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from axon.init import materialize
from axon.model import build
from launch.local import spawn
from parallel.data import DataParallel
from parallel.data_engine import adamw
from perfmodel.flops import n_params
from perfmodel.specs import ModelSpec, Optim

DDP_DEFAULT_MB = 25.0  # DistributedDataParallel's bucket_cap_mb when left as None
OPTIM = Optim(name="adamw", beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, grad_clip=0.0,
              warmup_steps=0, min_lr_ratio=1.0)


@dataclass(frozen=True)
class Bench:
    """What one world size runs."""

    spec: ModelSpec
    world: int
    bucket_mb: tuple[float, ...]
    seq_len: int
    micro_batch: int
    warmup: int
    trials: int
    lr: float = 1e-3
    seed: int = 1234

    @property
    def local_tokens(self) -> int:
        return self.micro_batch * self.seq_len


@dataclass
class Timing:
    """One step of one variant on one rank (seconds)."""

    total: float = 0.0
    forward: float = 0.0
    backward: float = 0.0  # DDP: includes its wait for the last all-reduce
    wait: float = 0.0  # ours: time in finish(); comm: the whole all-reduce
    optimizer: float = 0.0
    loss_sum: float = 0.0
    wait_from: float = 0.0  # CLOCK_MONOTONIC (one clock for all processes) around `wait`
    wait_to: float = 0.0
    cpu: float = 0.0  # CPU seconds of this process (all threads, gloo's included) over the step


def _clock() -> float:
    """System-wide monotonic time: stamps from different ranks on this host can be compared."""
    return time.clock_gettime(time.CLOCK_MONOTONIC)


def _model(b: Bench) -> torch.nn.Module:
    model = build(b.spec)
    materialize(model, b.spec, b.seed, torch.device("cpu"))
    return model


def _loss_sum(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    inputs, targets = batch[:, :-1], batch[:, 1:]  # [mbs, S] each
    logits = model(inputs)  # [mbs, S, V]
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")


class Ours:
    def __init__(self, b: Bench, model: torch.nn.Module, bucket_mb: float, overlap: bool):
        self.model = model
        self.dp = DataParallel([(list(self.model.parameters()), dist.group.WORLD, b.world)], bucket_mb=bucket_mb,
                               overlap=overlap)
        self.opt = adamw(dict(self.model.named_parameters()), OPTIM, b.lr)
        self.global_tokens = b.world * b.local_tokens

    def step(self, batch: torch.Tensor) -> Timing:
        self.dp.zero_grad()
        self.dp.reset_stats()
        t0 = _clock()
        loss = _loss_sum(self.model, batch)
        t1 = _clock()
        (loss / self.global_tokens).backward()
        t2 = _clock()
        self.dp.finish()
        t3 = _clock()
        self.opt.step()
        t4 = _clock()
        return Timing(t4 - t0, t1 - t0, t2 - t1, t3 - t2, t4 - t3, loss.item(), t2, t3)

    def grads(self) -> list[torch.Tensor]:
        return [p.grad for p in self.model.parameters()]


class Ddp:
    def __init__(self, b: Bench, model: torch.nn.Module, bucket_mb: float):
        self.ddp = DistributedDataParallel(model, bucket_cap_mb=None if bucket_mb == DDP_DEFAULT_MB else bucket_mb)
        self.opt = adamw(dict(model.named_parameters()), OPTIM, b.lr)
        self.local_tokens = b.local_tokens

    def step(self, batch: torch.Tensor) -> Timing:
        self.opt.zero_grad(set_to_none=True)
        t0 = _clock()
        loss = _loss_sum(self.ddp, batch)
        t1 = _clock()
        (loss / self.local_tokens).backward()  # DDP averages over ranks
        t2 = _clock()
        self.opt.step()
        t3 = _clock()
        return Timing(t3 - t0, t1 - t0, t2 - t1, 0.0, t3 - t2, loss.item())

    def grads(self) -> list[torch.Tensor]:
        return [p.grad for p in self.ddp.module.parameters()]


class CommOnly:
    """The buckets of `ours` (copies), all-reduced back to back with nothing else running."""

    def __init__(self, ours: Ours):
        self.ours = ours
        self.buffers = [bucket.buffer.clone() for bucket in ours.dp.buckets]

    def step(self, batch: torch.Tensor) -> Timing:
        for buf, bucket in zip(self.buffers, self.ours.dp.buckets):
            buf.copy_(bucket.buffer)  # realistic values, never overflowing from repeated sums
        t0 = _clock()
        handles = [dist.all_reduce(buf, async_op=True) for buf in self.buffers]
        for h in handles:
            h.wait()
        t1 = _clock()
        return Timing(total=t1 - t0, wait=t1 - t0, wait_from=t0, wait_to=t1)


def _batch(b: Bench, step: int, rank: int) -> torch.Tensor:
    """This rank's tokens for `step` [mbs, S+1], the same for every variant."""
    g = torch.Generator().manual_seed(b.seed * 1_000_003 + step * 1009 + rank)
    return torch.randint(0, b.spec.vocab_size, (b.micro_batch, b.seq_len + 1), generator=g)


def _grad_rel_diff(a: list[torch.Tensor], c: list[torch.Tensor]) -> float:
    diff = max((x - y).abs().max().item() for x, y in zip(a, c))
    scale = max(x.abs().max().item() for x in a)
    out = torch.tensor([diff / scale])
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out.item()


def run_rank(b: Bench) -> dict[str, Any]:
    """All trials on this rank; returns every rank's timings (gathered) and the sanity checks."""
    rank = dist.get_rank()
    base = _model(b)  # materialized once; every variant trains its own copy of the same weights
    variants: dict[str, Any] = {}
    for mb in b.bucket_mb:
        variants[f"ours b={mb:g}"] = Ours(b, copy.deepcopy(base), mb, overlap=True)
        variants[f"ddp b={mb:g}"] = Ddp(b, copy.deepcopy(base), mb)
        variants[f"comm b={mb:g}"] = CommOnly(variants[f"ours b={mb:g}"])
    first = b.bucket_mb[0]
    variants[f"ours b={first:g} seq"] = Ours(b, copy.deepcopy(base), first, overlap=False)
    variants[f"comm b={first:g} seq"] = CommOnly(variants[f"ours b={first:g} seq"])
    names = list(variants)
    timings: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    grad_check: dict[str, float] = {}
    for trial in range(b.warmup + b.trials):
        batch = _batch(b, trial, rank)
        shift = trial % len(names)
        for name in names[shift:] + names[:shift]:
            dist.barrier()
            cpu0 = time.process_time()
            t = variants[name].step(batch)
            t.cpu = time.process_time() - cpu0
            if trial >= b.warmup:
                timings[name].append(asdict(t))
            elif name.startswith(("ours", "ddp")):
                timings.setdefault(f"{name} warmup loss", []).append({"loss_sum": t.loss_sum})
        if trial == 0:  # every variant has reduced step 0's gradients: compare them
            for mb in b.bucket_mb:
                grad_check[f"b={mb:g}"] = _grad_rel_diff(variants[f"ours b={mb:g}"].grads(),
                                                         variants[f"ddp b={mb:g}"].grads())
    meta = {"buckets": {n: len(v.dp.buckets) for n, v in variants.items() if isinstance(v, Ours)},
            "ddp_buckets": {n: _ddp_bucket_count(v.ddp) for n, v in variants.items() if isinstance(v, Ddp)}}
    gathered: list[Any] = [None] * b.world
    dist.all_gather_object(gathered, timings)
    return {"timings": gathered, "grad_rel_diff": grad_check, **meta}


def _ddp_bucket_count(ddp: DistributedDataParallel) -> int:
    """Buckets after DDP's rebuild in backward order (done on its second iteration)."""
    return len(ddp.reducer._get_zeros_like_grad_buckets())


# ---- reading the results (parent process) ----

def _q(values: list[float]) -> tuple[float, float, float]:
    """Median and the 25th / 75th percentiles."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    p25, p50, p75 = statistics.quantiles(values, n=4, method="inclusive")
    return p50, p25, p75


def _fmt(q: tuple[float, float, float], digits: int = 2) -> str:
    return f"{q[0]:.{digits}f} [{q[1]:.{digits}f}-{q[2]:.{digits}f}]"


def _per_trial(result: dict[str, Any], name: str, key: str, reduce: Callable[[list[float]], float]) -> list[float]:
    """One value per trial: `key` of variant `name` reduced over ranks."""
    ranks = result["timings"]
    return [reduce([r[name][t][key] for r in ranks]) for t in range(len(ranks[0][name]))]


def _critical_wait(result: dict[str, Any], name: str) -> list[float]:
    """Per trial: from the moment the LAST rank starts waiting to the moment the last one is done.

    For ours that is the communication left exposed after every rank finished backward; the
    per-rank time in finish() would also count waiting for slower ranks' backward (skew).
    """
    ranks = result["timings"]
    return [max(r[name][t]["wait_to"] for r in ranks) - max(r[name][t]["wait_from"] for r in ranks)
            for t in range(len(ranks[0][name]))]


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def report(b: Bench, result: dict[str, Any]) -> list[str]:
    """Markdown table rows for this world size: one per bucket size, then the overlap-off control."""
    rows = []
    for mb in b.bucket_mb:
        label = f"{mb:g} (ddp default)" if mb == DDP_DEFAULT_MB else f"{mb:g}"
        rows.append(_row(b, result, label, f"ours b={mb:g}", f"ddp b={mb:g}", f"comm b={mb:g}"))
    first = b.bucket_mb[0]
    rows.append(_row(b, result, f"{first:g}, ours overlap off", f"ours b={first:g} seq", f"ddp b={first:g}",
                     f"comm b={first:g} seq"))
    return rows


def _row(b: Bench, result: dict[str, Any], label: str, ours: str, ddp: str, comm: str) -> str:
    tokens = b.world * b.local_tokens
    ours_tps = [tokens / s for s in _per_trial(result, ours, "total", max)]
    ddp_tps = [tokens / s for s in _per_trial(result, ddp, "total", max)]
    ratio = [o / d for o, d in zip(ours_tps, ddp_tps)]  # same trial, seconds apart
    cpu = [o / d for o, d in zip(_per_trial(result, ours, "cpu", _mean), _per_trial(result, ddp, "cpu", _mean))]
    exposed, total = _critical_wait(result, ours), _critical_wait(result, comm)
    hidden = [1 - e / t for e, t in zip(exposed, total)]
    return (f"| {b.world} | {label} | {result['buckets'][ours]} / {result['ddp_buckets'][ddp]} "
            f"| {_fmt(_q(ours_tps), 0)} | {_fmt(_q(ddp_tps), 0)} | {_fmt(_q(ratio))} | {_fmt(_q(cpu))} "
            f"| {_fmt(_q([e * 1e3 for e in exposed]), 0)} | {_fmt(_q([t * 1e3 for t in total]), 0)} "
            f"| {_fmt(_q(hidden))} |")


def phases(b: Bench, result: dict[str, Any]) -> list[str]:
    """Median per-phase milliseconds (mean over ranks) of every variant."""
    out = []
    for name in result["timings"][0]:
        if name.endswith("loss"):
            continue
        cells = [_q(_per_trial(result, name, key, _mean))[0] * 1e3 for key in ("forward", "backward", "wait",
                                                                               "optimizer", "total", "cpu")]
        out.append(f"| {b.world} | {name} | " + " | ".join(f"{c:.0f}" for c in cells) + " |")
    return out


def sanity(b: Bench, result: dict[str, Any]) -> list[str]:
    """Ours vs DDP: reduced step-0 gradients, and the global mean loss at every step."""
    ranks = result["timings"]
    lines = []
    for mb in b.bucket_mb:
        ours, ddp = f"ours b={mb:g}", f"ddp b={mb:g}"
        losses = {}
        for name in (ours, ddp):
            warm = [sum(r.get(f"{name} warmup loss", [])[t]["loss_sum"] for r in ranks) for t in range(b.warmup)]
            timed = [sum(r[name][t]["loss_sum"] for r in ranks) for t in range(b.trials)]
            losses[name] = [x / (b.world * b.local_tokens) for x in warm + timed]
        d0 = abs(losses[ours][0] - losses[ddp][0])
        dmax = max(abs(x - y) for x, y in zip(losses[ours], losses[ddp]))
        lines.append(f"b={mb:g} MiB: step-0 loss {losses[ours][0]:.6f} (ours) vs {losses[ddp][0]:.6f} (ddp), "
                     f"|diff| {d0:.1e} ({'ok' if d0 <= 1e-5 else 'FAIL'} at 1e-5); max |diff| over "
                     f"{len(losses[ours])} steps {dmax:.1e}; step-0 reduced gradients max rel diff "
                     f"{result['grad_rel_diff'][f'b={mb:g}']:.1e}; buckets ours {result['buckets'][ours]}, "
                     f"ddp {result['ddp_buckets'][ddp]}")
    return lines


TABLE_HEAD = ["| ranks | bucket MiB | buckets ours / ddp | ours tok/s | ddp tok/s | tok/s ours/ddp "
              "| CPU per step ours/ddp | ours exposed comm ms | total comm ms | ours hidden |",
              "|---|---|---|---|---|---|---|---|---|---|"]
PHASE_HEAD = ["| ranks | variant | forward | backward | finish() (incl. rank skew) | AdamW | step | CPU ms |",
              "|---|---|---|---|---|---|---|---|"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--bucket-mb", type=float, nargs="+", default=[4.0, 25.0])
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--d-ff", type=int, default=688)
    ap.add_argument("--json", type=Path, help="also write the raw per-rank timings here")
    args = ap.parse_args()
    spec = ModelSpec(n_layers=args.layers, d_model=args.d_model, n_heads=args.heads, n_kv_heads=args.kv_heads,
                     d_ff=args.d_ff, max_seq_len=args.seq_len)
    spec.check()
    print(f"model {n_params(spec) / 1e6:.2f}M params ({n_params(spec) * 4 / 2**20:.1f} MiB of fp32 gradients), "
          f"seq {args.seq_len}, micro-batch {args.micro_batch} per rank, {args.warmup} warm-up + "
          f"{args.trials} trials, torch {torch.__version__}, gloo on 127.0.0.1, 1 thread per rank", flush=True)
    rows, phase_rows, checks, raw = [], [], [], {}
    for world in args.ranks:
        b = Bench(spec, world, tuple(args.bucket_mb), args.seq_len, args.micro_batch, args.warmup, args.trials)
        start = time.perf_counter()
        result = spawn(b.world, run_rank, b, timeout_s=300)[0]
        rows += report(b, result)
        phase_rows += phases(b, result)
        checks += [f"{world} ranks, {line}" for line in sanity(b, result)]
        raw[world] = result
        if args.json:  # after every world size, so a long run keeps what it has measured
            args.json.write_text(json.dumps(raw))
        print(f"\n{world} ranks done in {time.perf_counter() - start:.0f} s; results so far:", flush=True)
        print("\nTokens/s and communication (median [25th-75th percentile] over trials):")
        print("\n".join(TABLE_HEAD + rows))
        print("\nPhases (median ms, mean over ranks; ddp's backward includes its reduction wait; CPU ms: the "
              "rank's process CPU time over the step, all threads):")
        print("\n".join(PHASE_HEAD + phase_rows))
        print("\nSanity (ours vs DDP, same init and data):")
        print("\n".join(checks), flush=True)

if __name__ == "__main__":
    main()
