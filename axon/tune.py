"""`axon tune`: predict and rank parallel layouts with the performance model.

Usage:
    axon tune model=llama3.1-405b cluster=perlmutter cluster.nodes=256 [parallel.pp=8 ...]
              [--top N] [--json] [--out FILE.yaml] [--plot FILE.png] [--why-not dp=8,tp_col=2,...]
    axon tune --calibrate [cluster.gpus_per_node=8] [model=tiny] [train.seq_len=128]

Hydra overrides pick the model, the cluster (world = cluster.nodes x cluster.gpus_per_node),
the batch (train.global_batch_size, train.seq_len) and any `parallel.*` settings to hold fixed;
with all six degrees fixed it evaluates just that plan (an error naming what overflows when it does
not fit the device memory). The table shows each plan's memory against the device's HBM; below it
come what limits the pick, how a near-tie was broken, and, with `--why-not LAYOUT`, why another
layout lost (axon/tune_explain.py). `--out` writes the winner as a parallel
config group file: save it as configs/parallel/<name>.yaml and run `axon train parallel=<name>`
(the file's first line also lists the same plan as `parallel.*=` overrides). `--calibrate`
measures this machine (collectives, GEMMs and a Block of the given model) and writes
configs/cluster/local-cpu.yaml.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from axon import preflight
from axon import tune_explain as explain
from axon.config import ConfigError, RunConfig, freeze, load
from axon.errors import Parser, UsageError, guarded
from perfmodel import rules
from perfmodel.estimate import Estimate, estimate
from perfmodel.flops import n_params
from perfmodel.candidates import parse_constraints
from perfmodel.search import search
from perfmodel.specs import AXES, Cluster, ModelSpec, Plan, PlanError

GiB = 2**30


def _parser() -> argparse.ArgumentParser:
    ap = Parser(prog="axon tune", description=__doc__.split("\n\n")[0] + " Settings as for axon "
                                 "train (axon train --help lists them).", usage="axon tune [options] [key=value ...]")
    ap.add_argument("--top", type=int, default=10, help="how many plans to show (default 10)")
    ap.add_argument("--json", action="store_true", help="print the ranked plans as JSON")
    ap.add_argument("--out", type=Path, help="write the winning plan as a parallel config YAML")
    ap.add_argument("--plot", type=Path, help="draw the top plans' time and memory per rank to this PNG")
    ap.add_argument("--why-not", metavar="LAYOUT", help="explain why a layout (e.g. dp=8,tp_col=2; degrees not "
                                                        "given are 1, other knobs optional) was not picked")
    ap.add_argument("--calibrate", action="store_true", help="measure this machine, write configs/cluster/local-cpu.yaml")
    ap.add_argument("--debug", action="store_true", help="print the full traceback of an error")
    return ap


def main(argv: list[str]) -> int:
    return guarded("axon tune", _main, argv)


def _main(argv: list[str]) -> int:
    args, overrides = _parser().parse_known_args(argv)
    bad = [o for o in overrides if o.startswith("-")]
    if bad:
        raise ConfigError(f"unknown option(s) {' '.join(bad)}; see axon tune --help")
    if args.top < 1:
        raise UsageError(f"--top {args.top} must be >= 1 (how many plans to show)")
    for option, path in (("--out", args.out), ("--plot", args.plot)):
        if path is not None:
            preflight.check_output_file(path, option)
    if args.calibrate:
        from axon.calibrate import calibrate

        cfg = freeze(load(overrides))
        print(f"wrote {calibrate(cfg.model, cfg.train.seq_len, cfg.cluster.gpus_per_node)}")
        return 0
    return _tune(args, overrides)


def _given(overrides: list[str], key: str) -> bool:
    return any(o.lstrip("+~").partition("=")[0] == key for o in overrides)


def default_batch(model: ModelSpec, gbs: int, seq: int) -> tuple[int, int, str]:
    """A batch fit for the model (train.* defaults are sized for the tiny CPU model): the sequence
    is the model's context up to 8192 tokens, the batch about 0.5M tokens below 1B parameters and
    4M above (GPT-3's and Llama 3's pre-training batches). Returns (batch, seq, why)."""
    params = n_params(model)
    if params < 1e8:
        return gbs, seq, ""
    seq = min(model.max_seq_len, 8192)
    tokens = 2**19 if params < 1e9 else 2**22
    gbs = max(1, tokens // seq)
    return gbs, seq, (f"batch {gbs} x {seq} tokens (~{gbs * seq / 1e6:.1f}M) chosen for a {params / 1e9:.1f}B-parameter "
                      f"model; set train.global_batch_size and train.seq_len to change it")


def check_fixed(cfg: RunConfig) -> None:
    """The rules every layout must meet, on the settings given (the search only skips plans
    that break them, so a bad fixed setting would read as "no layout fits")."""
    rules.raise_if(rules.model_rules(cfg.model) + rules.setting_rules(cfg.plan)
                   + rules.split_rules(cfg.model, Plan(), cfg.train.seq_len))


def _tune(args: argparse.Namespace, overrides: list[str]) -> int:
    cfg = freeze(load(overrides))
    check_fixed(cfg)
    cluster, model = cfg.cluster, cfg.model
    world = cluster.world_size
    gbs, seq = cfg.train.global_batch_size, cfg.train.seq_len
    note = ""
    if not (_given(overrides, "train.global_batch_size") or _given(overrides, "train.seq_len")):
        gbs, seq, note = default_batch(model, gbs, seq)
    constraints = parse_constraints(overrides)
    searched = None
    if all(axis in constraints for axis in AXES):
        estimates = [estimate(model, cfg.plan, cluster, gbs, seq)]
        if not estimates[0].fits:
            raise explain.pinned_error(estimates[0], cluster,
                                       explain.fitting_variant(model, cluster, cfg.plan, gbs, seq))
    else:
        result = search(model, cluster, world, constraints, gbs, seq, top=args.top)
        estimates, searched = result.estimates, result
    if not estimates:
        raise explain.no_layout_error(model, cluster, world, constraints, gbs, seq,
                                      f"{world} devices for model={cfg.raw['model']['name']}")
    header = {"model": cfg.raw["model"]["name"], "cluster": cluster.name, "world": world,
              "global_batch_size": gbs, "seq_len": seq, "constraints": constraints,
              "hbm_gib": cluster.hbm_bytes / GiB}
    if note:
        header["batch_note"] = note
    if searched is not None:
        header.update(layouts=searched.layouts, plans_timed=searched.candidates, search_s=searched.seconds)
    why_not = args.why_not and explain.why_not(model, cluster, world, constraints, gbs, seq, args.why_not,
                                                estimates[0])
    if args.json:
        print(json.dumps({**header, "candidates": [e.to_dict() for e in estimates],
                          **({"why_not": why_not} if why_not else {})}, indent=2))
    else:
        print(report(header, estimates, cluster) + (f"\n{why_not}" if why_not else ""))
    if args.out:
        args.out.write_text(plan_yaml(estimates[0].plan, header))
        print(f"wrote {args.out}", file=sys.stderr if args.json else sys.stdout)
    if args.plot:
        plot(estimates, args.plot, f"{header['model']} on {world} x {cluster.name}", cluster.hbm_bytes)
        print(f"wrote {args.plot}", file=sys.stderr if args.json else sys.stdout)
    return 0


def layout_name(p: Plan) -> str:
    tp = f"tp={p.tp_col}x{p.tp_row}x{p.tp_depth}" if p.tp > 1 else "tp=1"
    sched = f" {p.schedule}" + (f"/v{p.virtual_stages}" if p.virtual_stages > 1 else "") if p.pp > 1 else ""
    cp = f" cp={p.cp}({p.cp_mode})" if p.cp > 1 else ""
    return f"dp={p.dp} pp={p.pp}{cp} {tp}{sched}"


def knobs(p: Plan) -> str:
    out = [f"zero={p.zero}", f"mbs={p.micro_batch_size}"]
    if p.recompute != "none":
        out.append(f"recompute={p.recompute}")
    if p.sequence_parallel:
        out.append("sp")
    if p.offload.optimizer:
        out.append("offload-opt")
    if p.offload.activations:
        out.append(f"offload-act={p.offload.activations:g}")
    return " ".join(out)


def report(header: dict[str, Any], estimates: list[Estimate], cluster: Cluster) -> str:
    """The ranked table (memory against the device's HBM), the winner's time and memory breakdown,
    what limits it, and why it beats the runner-up (with the tie-break when they are close)."""
    stack = (f"{cluster.stack} stack, a Block at {cluster.efficiency:.0%} of peak (cluster.stack)"
             if cluster.eager_efficiency is not None or cluster.compiled_efficiency is not None else
             f"a Block at {cluster.efficiency:.0%} of peak (measured on this machine's stack)")  # local-cpu: one rate
    stack += "".join(f", {name} priced (cluster.{knob}; axon train refuses it)" for name, knob, on in (
        ("Float8 Linears", "float8_linears", cluster.float8_linears), ("AsyncTP", "async_tp", cluster.async_tp)) if on)
    lines = [f"{header['model']} on {header['world']} devices of {header['cluster']}: global batch "
             f"{header['global_batch_size']} x {header['seq_len']} tokens; {stack}"]
    if header.get("batch_note"):
        lines.append(header["batch_note"])
    if "layouts" in header:
        lines.append(f"searched {header['layouts']} layouts, timed {header['plans_timed']} fitting plans in "
                     f"{header['search_s']:.2f} s; best plan per layout:")
    lines.append(f"{'#':>3} {'step s':>8} {'tok/s/dev':>10} {'MFU':>6} {'mem/HBM GiB':>16}  layout / knobs")
    for i, e in enumerate(estimates, 1):
        per_dev = e.tokens_per_s / e.plan.world_size
        lines.append(f"{i:>3} {e.step_time_s:>8.3f} {per_dev:>10.1f} {e.mfu:>6.1%} "
                     f"{explain.memory_fit(e.memory, cluster):>16}  {layout_name(e.plan)} | {knobs(e.plan)}")
    win = estimates[0]
    lines.append("")
    lines.append("winner, time per step: " + ", ".join(f"{k[:-2]} {v:.3f}s" for k, v in win.breakdown.items() if v > 0))
    mem = win.memory
    lines.append(f"winner, memory per device (GiB): params {mem.params / GiB:.2f}, grads {mem.grads / GiB:.2f}, "
                 f"optimizer {mem.optimizer / GiB:.2f}, activations {mem.activations / GiB:.2f}, buffers "
                 f"{mem.buffers / GiB:.2f}, overhead {mem.overhead / GiB:.2f}; total {mem.total / GiB:.2f} of {cluster.hbm_bytes / GiB:.2f} HBM"
                 + (f"; host {mem.host / GiB:.2f}" if mem.host else ""))
    lines += explain.overlap(win)
    lines.append(explain.limits(win, cluster))
    if len(estimates) > 1:
        lines.append(why(win, estimates[1]))
        lines += [t for t in (explain.tie(win, estimates[1]),) if t]
    return "\n".join(lines)


def why(win: Estimate, other: Estimate) -> str:
    """The components where the winner saves the most over the runner-up."""
    diffs = sorted(((other.breakdown[k] - v, k[:-2]) for k, v in win.breakdown.items()), reverse=True)
    gains = [f"{name} -{d:.3f}s" for d, name in diffs if d > 1e-4][:3]
    losses = [f"{name} +{-d:.3f}s" for d, name in diffs if d < -1e-4][:2]
    text = (f"why: {(other.step_time_s / win.step_time_s - 1):.2%} faster than #2 ({layout_name(other.plan)} | "
            f"{knobs(other.plan)}): " + (", ".join(gains) or "equal step components"))
    return text + (f"; it pays {', '.join(losses)}" if losses else "")


def plan_yaml(plan: Plan, header: dict[str, Any]) -> str:
    """The plan as a `parallel` group file (configs/parallel/<name>.yaml -> `axon train parallel=<name>`)."""
    d = plan.to_dict()
    off = d.pop("offload")
    flat = {**d, "offload.optimizer": off["optimizer"], "offload.activations": off["activations"]}
    overrides = " ".join(f"parallel.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in flat.items())
    lines = [f"# axon tune's pick for {header['model']} on {header['world']} devices of {header['cluster']} "
             f"(global batch {header['global_batch_size']}, seq {header['seq_len']}).",
             "# Save as configs/parallel/<name>.yaml and run `axon train parallel=<name>`, or pass as overrides:",
             f"# {overrides}",
             "defaults: [parallel_schema]"]
    for k, v in d.items():
        lines.append(f"{k}: {json.dumps(v)}")
    lines.append(f"offload: {{optimizer: {json.dumps(off['optimizer'])}, activations: {off['activations']}}}")
    return "\n".join(lines) + "\n"


def plot(estimates: list[Estimate], path: Path, title: str, hbm_bytes: float) -> None:
    """Write `plot_figure` to `path` (PNG)."""
    fig = plot_figure(estimates, title, hbm_bytes)
    fig.savefig(path, dpi=120)


def plot_figure(estimates: list[Estimate], title: str, hbm_bytes: float) -> Any:
    """Two panels: each plan's stacked step-time components, and its stacked memory per rank with
    the device's HBM as a line; legends sit outside the bars."""
    try:
        from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global figure state
    except ImportError as err:
        raise PlanError(f"--plot needs matplotlib ({err}); pip install matplotlib or drop --plot") from None
    fig = Figure(figsize=(max(9, 2 * len(estimates) + 5), 4.8))
    t_ax, m_ax = fig.subplots(1, 2)
    fig.suptitle(title)
    labels = [f"#{i + 1}\n{layout_name(e.plan)}".replace(" ", "\n") for i, e in enumerate(estimates)]
    _stack(t_ax, [{k[:-2].replace("_", " "): v for k, v in e.breakdown.items()} for e in estimates], labels)
    t_ax.set_ylabel("seconds per step")
    _stack(m_ax, [{k: getattr(e.memory, k) / GiB for k in explain.MEMORY_PARTS} for e in estimates], labels)
    m_ax.axhline(hbm_bytes / GiB, color="black", linestyle="--", label="HBM")
    m_ax.set_ylabel("GiB per rank")
    for ax in (t_ax, m_ax):
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    return fig


def _stack(ax: Any, rows: list[dict[str, float]], labels: list[str]) -> None:
    """Stacked bars of `rows` (one dict of component -> value per plan), components all zero left out."""
    xs = list(range(len(rows)))
    bottoms = [0.0] * len(rows)
    for k in rows[0]:
        vals = [r[k] for r in rows]
        if any(vals):
            ax.bar(xs, vals, bottom=bottoms, label=k)
            bottoms = [b + v for b, v in zip(bottoms, vals)]
    ax.set_xticks(xs, labels, fontsize=7)
