"""End to end: the real `axon train` against training scripts written with PyTorch's own native
parallelism, on the same model, data, optimizer and batch, one parallelism mode at a time.

    .venv/bin/python benchmarks/e2e_vs_torch.py                                   # all modes, 4 ranks, 3 trials
    .venv/bin/python benchmarks/e2e_vs_torch.py --modes dp,tp --trials 2 --out /tmp/e2e.md
    .venv/bin/python benchmarks/e2e_vs_torch.py --ranks 4 8 --trials 2 --steps 10

What runs. Axon: `python -m axon.train` as a user starts it (its own W local gloo workers,
launch.nproc_per_node=W), the layout set by overrides, evaluation, checkpoints, wandb, the
progress bar and GEMM tuning off; its tokens/s per step are read from the run's metrics.jsonl
(`tokens_per_s` = global tokens / rank 0's step time). Peers (benchmarks/e2e_peers/, each a
subprocess starting its own W gloo ranks on 127.0.0.1, one thread per rank): Axon's model
definition and initialization, Axon's corpus and batch sampler (the same global batch at every
step), Axon's AdamW groups, learning-rate schedule and clipping, the same global batch,
micro-batch, sequence length and fp32, and the same clock (rank 0's step, which contains an
all-reduce of the loss, so the slowest rank's forward/backward counts). Per mode:

    mode            Axon                          native peer(s)
    dp              parallel.dp=W                 DDP
    zero1           dp=W zero=1                   DDP + ZeroRedundancyOptimizer, and FSDP2 without
                                                  resharding, gradients reduce-scattered once per step
    zero2           dp=W zero=2                   FSDP2 reshard_after_forward=False
    zero3           dp=W zero=3                   FSDP2 fully_shard (defaults)
    tp / tp_sp      tp_col=W (+ sequence_parallel) DTensor ColwiseParallel/RowwiseParallel (+ SequenceParallel)
    tp3d            tp_col x tp_row x tp_depth    no native 3D TP: the better of DTensor 1D TP and TP+SP at W
    pp_1f1b         pp=W schedule=1f1b            torch.distributed.pipelining Schedule1F1B
    pp_interleaved  schedule=interleaved, v=2     ScheduleInterleaved1F1B
    pp_zbv          schedule=zbv (V, 2 chunks)    ScheduleZBVZeroBubble
    cp              cp=2 dp=W/2 (ring)            none usable (torch's context_parallel has no CPU SDPA
                                                  sharding rule): DDP at dp=W (cp=1) instead
    auto            parallel=auto, the micro-      the best native fixed layout of the same model and world
                    batch size its pick too       size measured in the same trial: DDP at the shape's
                                                  micro-batch and, where it differs, at the whole per-rank
                                                  batch (no accumulation), and every other native run of the
                                                  trial (the other modes'); Axon's fixed dp=W is measured
                                                  and listed beside it, not counted as a peer
The pipeline modes train a deeper model (--pp-layers, default 8) so that every chunk of the
interleaved and V schedules holds a layer; everything else trains --layers (default 4).

Method: K trials (--trials); in each, every run of a mode (Axon and its peers) starts as a fresh
process, in an order rotated by the trial index; a run that another mode already measured in the
same trial (e.g. DDP for cp and auto) is reused. Each run does W warm-up + N timed steps
(--warmup, --steps); its figure is the median tokens/s of the timed steps. Per mode: Axon's median
tok/s over trials, the best peer's, the ratio Axon / best peer per trial (median [min-max]), the
first-step losses (they agree where the setups are the same math) and the machine's 1-minute load
average before and after. Prints a markdown table (--out also writes it). Absolute numbers move
with the machine's load; ratios within a trial are the figure to read.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: the repository root holds the `benchmarks` package
    sys.path.insert(0, str(ROOT))
from benchmarks.e2e_peers.common import Shape  # noqa: E402
ALL_MODES = ("dp", "zero1", "zero2", "zero3", "tp", "tp_sp", "tp3d", "pp_1f1b", "pp_interleaved", "pp_zbv",
             "cp", "auto")
GOALS = {"dp": 0.98, "zero3": 1.1, "tp": 1.1, "tp_sp": 1.1, "tp3d": 1.1, "pp_1f1b": 1.05,
         "pp_interleaved": 1.05, "pp_zbv": 1.05, "auto": 1.2}  # the targets, Axon / best peer


@dataclass(frozen=True)
class Run:
    """One training job: Axon (runner "axon", args = overrides) or a peer (runner = script, args = (variant,))."""

    key: str
    runner: str
    args: tuple[str, ...]
    n_layers: int
    micro_batch: Optional[int] = None  # None: the shape's; Axon with free_micro_batch: its own pick
    free_micro_batch: bool = False


@dataclass(frozen=True)
class Mode:
    name: str
    axon: Run
    peers: tuple[Run, ...]
    note: str
    vs_fixed: bool = False  # auto: compare with every native fixed layout measured at this world size


@dataclass
class Measured:
    tps: list[float] = field(default_factory=list)  # timed steps' tokens/s
    step_s: list[float] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)  # rank 0's process CPU seconds per timed step
    first_loss: Optional[float] = None
    error: Optional[str] = None
    wall_s: float = 0.0
    n_layers: int = 0  # the model's depth (auto compares only with runs of the same model)
    runner: str = ""  # "axon" or the peer script (auto compares only with native runs)
    layout: str = ""  # Axon: the plan it trained with (plan.json), e.g. what parallel=auto picked
    predicted_tps: Optional[float] = None  # Axon: the performance model's tokens/s for that plan (plan.json)

    @property
    def median(self) -> float:
        return statistics.median(self.tps) if self.tps and self.error is None else 0.0

    @property
    def cpu(self) -> Optional[float]:
        return statistics.median(self.cpu_s) if self.cpu_s and self.error is None else None


def _tp3d(world: int) -> tuple[int, int, int]:
    """A 3D tensor-parallel layout of `world` ranks: factors of 2 dealt to col, depth, row in turn."""
    dims, axis, rest = [1, 1, 1], 0, world
    while rest % 2 == 0 and rest > 1:
        dims[(0, 2, 1)[axis % 3]] *= 2
        rest, axis = rest // 2, axis + 1
    dims[0] *= rest
    return dims[0], dims[1], dims[2]


def _peer(script: str, variant: str, layers: int) -> Run:
    return Run(f"torch {variant}" + (f" L{layers}" if script == "pipelining" else ""), script, (variant,), layers)


def _whole_batch_ddp(world: int, layers: int, micro: int, global_batch: int) -> tuple[Run, ...]:
    """DDP without accumulation (micro-batch = the rank's whole batch), where that differs from `micro`."""
    whole = global_batch // world
    return () if whole == micro else (replace(_peer("ddp_fsdp", "ddp", layers), key=f"torch ddp mbs{whole}",
                                              micro_batch=whole),)


def modes(world: int, layers: int, pp_layers: int, micro: int = 2, global_batch: int = 16) -> dict[str, Mode]:
    w = world
    x, y, z = _tp3d(w)
    axon = lambda key, *a, n=layers: Run(f"axon {key}", "axon", a, n)  # noqa: E731
    ddp, tp, tp_sp = _peer("ddp_fsdp", "ddp", layers), _peer("tensor_parallel", "tp", layers), \
        _peer("tensor_parallel", "tp_sp", layers)
    pp = lambda sched, *a: axon(f"pp={w} {sched}", f"parallel.pp={w}", f"parallel.schedule={sched}", *a,  # noqa: E731
                                n=pp_layers)
    return {
        "dp": Mode("dp", axon(f"dp={w}", f"parallel.dp={w}"), (ddp,), "DDP"),
        "zero1": Mode("zero1", axon(f"dp={w} zero=1", f"parallel.dp={w}", "parallel.zero=1"),
                      (_peer("ddp_fsdp", "ddp_zero1", layers), _peer("ddp_fsdp", "fsdp_noreshard_acc", layers)),
                      "DDP+ZeroRedundancyOptimizer; FSDP2 no reshard, one reduce-scatter per step"),
        "zero2": Mode("zero2", axon(f"dp={w} zero=2", f"parallel.dp={w}", "parallel.zero=2"),
                      (_peer("ddp_fsdp", "fsdp_noreshard", layers),), "FSDP2 reshard_after_forward=False"),
        "zero3": Mode("zero3", axon(f"dp={w} zero=3", f"parallel.dp={w}", "parallel.zero=3"),
                      (_peer("ddp_fsdp", "fsdp", layers),), "FSDP2 fully_shard"),
        "tp": Mode("tp", axon(f"tp={w}", f"parallel.tp_col={w}"), (tp,), "DTensor TP"),
        "tp_sp": Mode("tp_sp", axon(f"tp={w} +sp", f"parallel.tp_col={w}", "parallel.sequence_parallel=true"),
                      (tp_sp,), "DTensor TP + SequenceParallel"),
        "tp3d": Mode("tp3d", axon(f"tp={x},{y},{z}", f"parallel.tp_col={x}", f"parallel.tp_row={y}",
                                  f"parallel.tp_depth={z}"), (tp, tp_sp),
                     "no native 3D TP: best of DTensor 1D TP, TP+SP"),
        "pp_1f1b": Mode("pp_1f1b", pp("1f1b"), (_peer("pipelining", "1f1b", pp_layers),), "Schedule1F1B"),
        "pp_interleaved": Mode("pp_interleaved", pp("interleaved", "parallel.virtual_stages=2"),
                               (_peer("pipelining", "interleaved", pp_layers),), "ScheduleInterleaved1F1B"),
        "pp_zbv": Mode("pp_zbv", pp("zbv", "parallel.virtual_stages=2"),
                       (_peer("pipelining", "zbv", pp_layers),), "ScheduleZBVZeroBubble"),
        "cp": Mode("cp", axon(f"cp=2 dp={w // 2}", "parallel.cp=2", f"parallel.dp={w // 2}", "parallel.cp_mode=ring"),
                   (ddp,), "no native CP on CPU (context_parallel: no sharding rule for CPU SDPA): DDP dp=W"),
        "auto": Mode("auto", replace(axon("auto", "parallel=auto"), free_micro_batch=True),
                     (axon(f"dp={w}", f"parallel.dp={w}"), ddp, *_whole_batch_ddp(w, layers, micro, global_batch)),
                     "best native fixed layout measured (same model, same trial)", vs_fixed=True),
    }


def run_shape(run: Run, shape: Shape) -> Shape:
    """`shape` with the run's model depth and micro-batch."""
    return replace(shape, n_layers=run.n_layers, micro_batch=run.micro_batch or shape.micro_batch)


def axon_command(run: Run, shape: Shape, world: int, run_dir: Path) -> list[str]:
    s = run_shape(run, shape)
    group = [a for a in run.args if a.startswith("parallel=")]  # a preset group goes first
    keys = {"model.n_layers": s.n_layers, "model.d_model": s.d_model, "model.n_heads": s.n_heads,
            "model.n_kv_heads": s.n_kv_heads, "model.d_ff": s.d_ff, "model.vocab_size": s.vocab_size,
            "model.max_seq_len": s.seq_len, "model.gemm_tuning": "off", "train.seq_len": s.seq_len,
            "train.global_batch_size": s.global_batch, "parallel.micro_batch_size": s.micro_batch,
            "train.steps": s.total_steps, "train.lr": s.lr, "train.seed": s.seed, "train.dtype": "fp32",
            "train.eval_every": 0, "train.log_every": 1, "train.progress": "false",
            "optim.beta1": s.beta1, "optim.beta2": s.beta2, "optim.eps": s.eps,
            "optim.weight_decay": s.weight_decay, "optim.grad_clip": s.grad_clip,
            "optim.warmup_steps": s.warmup_steps, "optim.min_lr_ratio": s.min_lr_ratio,
            "checkpoint.every": 0, "checkpoint.at_end": "false", "checkpoint.resume": "never",
            "logger.wandb.mode": "disabled", "logger.tensorboard.enabled": "false",
            "launch.nproc_per_node": world, "launch.backend": "gloo", "run.dir": str(run_dir)}
    if run.free_micro_batch:
        del keys["parallel.micro_batch_size"]
    rest = [a for a in run.args if a not in group]
    return [sys.executable, "-m", "axon.train", *group, *(f"{k}={v}" for k, v in keys.items()), *rest]


def peer_command(run: Run, shape: Shape, world: int, out: Path) -> list[str]:
    s = run_shape(run, shape)
    return [sys.executable, "-m", f"benchmarks.e2e_peers.{run.runner}", "--variant", run.args[0],
            "--world", str(world), "--shape", s.to_json(), "--out", str(out)]


def _error_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errs = [ln for ln in lines if "Error" in ln or "failed" in ln]
    return (errs[-1] if errs else (lines[-1] if lines else "no output"))[:240]


def execute(run: Run, shape: Shape, world: int, work: Path, tag: str) -> Measured:
    """Start the run as a subprocess; its timed steps' figures (or the error it ended with)."""
    work.mkdir(parents=True, exist_ok=True)
    target = work / f"{tag}.{'run' if run.runner == 'axon' else 'json'}"
    cmd = (axon_command(run, shape, world, target) if run.runner == "axon"
           else peer_command(run, shape, world, target))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        return Measured(error="timed out after 900 s", wall_s=time.perf_counter() - t0)
    (work / f"{tag}.log").write_text(" ".join(cmd) + "\n" + proc.stdout + proc.stderr)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return Measured(error=f"exit {proc.returncode}: {_error_line(proc.stdout + proc.stderr)}", wall_s=wall)
    records = _axon_records(target) if run.runner == "axon" else _peer_records(target)
    layout, predicted = _axon_plan(target) if run.runner == "axon" else ("", None)
    if run.runner == "axon":
        shutil.rmtree(target, ignore_errors=True)
    timed = records[shape.warmup:]
    if not timed:
        return Measured(error="no timed steps recorded", wall_s=wall)
    return Measured([r["tokens_per_s"] for r in timed], [r["step_time_s"] for r in timed],
                    [r["cpu_s"] for r in timed if r.get("cpu_s") is not None],
                    records[0]["loss"], None, wall, layout=layout, predicted_tps=predicted)


def _axon_plan(run_dir: Path) -> tuple[str, Optional[float]]:
    """From plan.json: the plan's non-default settings that name a layout, e.g. `dp=4 zero=1
    micro_batch_size=4`, and the performance model's tokens/s for it (None when absent)."""
    path = run_dir / "plan.json"
    if not path.is_file():
        return "", None
    info = json.loads(path.read_text())
    plan = info.get("plan", {})
    defaults = {"dp": 1, "pp": 1, "cp": 1, "tp_col": 1, "tp_row": 1, "tp_depth": 1, "zero": 0, "schedule": None,
                "virtual_stages": 1, "sequence_parallel": False, "micro_batch_size": 1, "recompute": "none"}
    if plan.get("pp", 1) == 1:
        defaults = {k: v for k, v in defaults.items() if k not in ("schedule", "virtual_stages")}
    layout = " ".join(f"{k}={plan[k]}" for k, default in defaults.items() if plan.get(k, default) != default)
    return layout, (info.get("estimate") or {}).get("tokens_per_s")


def _axon_records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    records = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.is_file() else []
    return sorted(({**r, "cpu_s": r.get("host_cpu_s")} for r in records if "tokens_per_s" in r),
                  key=lambda r: r["step"])


def _peer_records(path: Path) -> list[dict]:
    d = json.loads(path.read_text())
    return [{"tokens_per_s": t, "step_time_s": s, "cpu_s": c, "loss": loss}
            for t, s, c, loss in zip(d["tokens_per_s"], d["step_time_s"], d["cpu_s"], d["loss"])]


@dataclass
class ModeResult:
    mode: Mode
    world: int
    trials: list[dict[str, Measured]] = field(default_factory=list)  # per trial: run key -> figures
    baselines: list[dict[str, Measured]] = field(default_factory=list)  # auto: the fixed layouts per trial
    load: tuple[float, float] = (0.0, 0.0)


def run_mode(mode: Mode, world: int, shape: Shape, trials: int, cache: dict, work: Path) -> ModeResult:
    """All trials of one mode; runs already measured in the same trial (cache) are reused."""
    result = ModeResult(mode, world)
    load0 = os.getloadavg()[0]
    runs = [mode.axon, *mode.peers]
    for t in range(trials):
        order = runs[t % len(runs):] + runs[:t % len(runs)]
        got = {}
        for run in order:
            key = (world, t, run.key)
            if key not in cache:
                tag = f"w{world}_t{t}_{run.key.replace(' ', '_').replace('=', '').replace(',', '-')}"
                m = cache[key] = replace(execute(run, shape, world, work, tag), n_layers=run.n_layers,
                                         runner=run.runner)
                print(f"  [{mode.name} trial {t + 1}/{trials}] {run.key}: "
                      f"{m.error or f'{m.median:,.0f} tok/s'} ({m.wall_s:.0f} s)", flush=True)
            got[run.key] = cache[key]
        result.trials.append(got)
        if mode.vs_fixed:
            result.baselines.append(_fixed_layouts(cache, world, t, mode.axon))
    result.load = (load0, os.getloadavg()[0])
    return result


def _fixed_layouts(cache: dict, world: int, trial: int, auto: Run) -> dict[str, Measured]:
    """Every native run of the same model measured at this world size and trial."""
    return {k: m for (w, t, k), m in cache.items()
            if w == world and t == trial and m.runner != "axon" and m.error is None and m.n_layers == auto.n_layers}


def _spread(xs: list[float]) -> str:
    return f"{statistics.median(xs):.2f} [{min(xs):.2f}-{max(xs):.2f}]" if xs else "-"


def _ratio_cells(res: ModeResult) -> tuple[str, str, str, list[float], str]:
    """Axon tok/s, best peer tok/s (and which), ratio median [min-max]; the per-trial ratios; the
    best peer's rank-0 CPU seconds per step over Axon's, median [min-max] (> 1: Axon's step costs
    its host less CPU; the figure the machine's other load moves least)."""
    axon, best, names, ratios, cpu = [], [], [], [], []
    for t, got in enumerate(res.trials):
        a = got[res.mode.axon.key]
        peers = res.baselines[t] if res.mode.vs_fixed else {
            p.key: got[p.key] for p in res.mode.peers if got[p.key].error is None}
        if a.error is None:
            axon.append(a.median)
        if peers:
            name = max(peers, key=lambda k: peers[k].median)
            best.append(peers[name].median)
            names.append(name)
            if a.error is None:
                ratios.append(a.median / peers[name].median)
                if a.cpu and peers[name].cpu:
                    cpu.append(peers[name].cpu / a.cpu)
    fmt = lambda xs: f"{statistics.median(xs):,.0f}" if xs else "-"  # noqa: E731
    who = "/".join(sorted(set(names), key=names.index))  # the best peer of each trial, in order of first win
    return fmt(axon), f"{fmt(best)} ({who})" if who else "-", _spread(ratios), ratios, _spread(cpu)


def _losses(res: ModeResult) -> str:
    got = res.trials[0]
    a = got[res.mode.axon.key].first_loss
    peer_losses = [got[p.key].first_loss for p in res.mode.peers if got[p.key].first_loss is not None]
    show = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    return f"{show(a)} / {', '.join(show(v) for v in peer_losses) or '-'}"


def table(results: list[ModeResult]) -> list[str]:
    rows = ["| ranks | mode | Axon run | native peer | Axon tok/s | best peer tok/s | Axon / peer "
            "median [min-max] | goal | rank-0 CPU per step peer / Axon | step-1 loss Axon / peer(s) "
            "| load 1-min before -> after | errors |",
            "|---|---|---|---|---:|---:|---|---|---|---|---|---|"]
    for res in results:
        axon, best, ratio, ratios, cpu = _ratio_cells(res)
        goal = GOALS.get(res.mode.name)
        met = "" if goal is None else (f">= {goal} " + ("met" if ratios and statistics.median(ratios) >= goal
                                                          else "not met"))
        errors = sorted({f"{k}: {m.error}" for got in res.trials for k, m in got.items() if m.error})
        rows.append(f"| {res.world} | {res.mode.name} | {res.mode.axon.key} | {res.mode.note} | {axon} | {best} "
                    f"| {ratio} | {met} | {cpu} | {_losses(res)} | {res.load[0]:.1f} -> {res.load[1]:.1f} "
                    f"| {'; '.join(errors).replace('|', '/')} |")
    return rows


def runs_table(cache: dict) -> list[str]:
    """Every run measured: per trial median tok/s, Axon's predicted tok/s (performance model,
    cluster preset local-cpu) over it, median step time, rank 0's median CPU per step, wall time
    of the process."""
    rows = ["| ranks | trial | run | Axon plan | median tok/s | predicted / measured | median step s "
            "| rank-0 CPU s per step | process wall s | step-1 loss |", "|---|---|---|---|---:|---:|---:|---:|---:|---|"]
    for (w, t, k), m in sorted(cache.items()):
        if m.error:
            rows.append(f"| {w} | {t + 1} | {k} | | failed | | | | {m.wall_s:.0f} | {m.error.replace('|', '/')} |")
            continue
        pred = f"{m.predicted_tps / m.median:.2f}" if m.predicted_tps else ""
        cpu = f"{m.cpu:.3f}" if m.cpu else ""
        rows.append(f"| {w} | {t + 1} | {k} | {m.layout} | {m.median:,.0f} | {pred} "
                    f"| {statistics.median(m.step_s):.3f} | {cpu} | {m.wall_s:.0f} | {m.first_loss:.4f} |")
    return rows


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modes", default=",".join(ALL_MODES), help="comma-separated subset of " + ",".join(ALL_MODES))
    ap.add_argument("--ranks", type=int, nargs="+", default=[4])
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=3, help="warm-up steps per run (not timed)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--pp-layers", type=int, default=8, help="model depth for the pipeline modes")
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--global-batch", type=int, default=16)
    ap.add_argument("--out", type=Path, help="also write the tables (markdown) here")
    ap.add_argument("--keep", type=Path, help="keep the runs' logs and figures in this directory")
    args = ap.parse_args()
    bad = [m for m in args.modes.split(",") if m not in ALL_MODES]
    if bad:
        ap.error(f"unknown mode(s) {bad}; choose from {','.join(ALL_MODES)}")
    return args


def main() -> None:
    args = parse()
    shape = Shape(n_layers=args.layers, warmup=args.warmup, steps=args.steps, micro_batch=args.micro_batch,
                  global_batch=args.global_batch)
    work = args.keep or Path(tempfile.mkdtemp(prefix="e2e_vs_torch_"))
    head = [f"command: `{' '.join([Path(sys.executable).name, *sys.argv])}`",
            f"torch {torch.__version__}, gloo on 127.0.0.1, one thread per rank, {os.cpu_count()} CPU cores; shape "
            f"{json.dumps(asdict(shape))}; pipeline modes: {args.pp_layers} layers",
            f"load average at start: {', '.join(f'{x:.1f}' for x in os.getloadavg())}"]
    print("\n".join(head), flush=True)
    cache: dict = {}
    results = []
    for world in args.ranks:
        table_of = modes(world, args.layers, args.pp_layers, args.micro_batch, args.global_batch)
        for name in args.modes.split(","):
            print(f"{world} ranks, mode {name}", flush=True)
            results.append(run_mode(table_of[name], world, shape, args.trials, cache, work))
            print("\n".join(table(results[-1:])[2:]), flush=True)
    text = head + [f"load average at end: {', '.join(f'{x:.1f}' for x in os.getloadavg())}", ""] + table(results) \
        + ["", "Every run (median over its timed steps):", ""] + runs_table(cache)
    print("\n" + "\n".join(text))
    if args.out:
        args.out.write_text("\n".join(text) + "\n")


if __name__ == "__main__":
    main()
