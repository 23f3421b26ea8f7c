"""Validate the performance model on this machine: run every runnable plan of the tiny model on 8
gloo ranks for a few steps and compare the measured step time and peak memory per rank with
`perfmodel.estimate` (cluster=local-cpu, i.e. configs/cluster/local-cpu.yaml from
`axon tune --calibrate`).

    .venv/bin/python benchmarks/perfmodel_validate.py                 # every plan (about 15 min, 2 cores)
    .venv/bin/python benchmarks/perfmodel_validate.py --quick         # a handful of plans (about 1 min)
    .venv/bin/python benchmarks/perfmodel_validate.py --rescore FILE  # re-predict saved measurements

The 8 ranks start once; every plan then runs inside the same world (benchmarks/perfmodel_world.py):
its Grid and Trainer are built, `--warmup` steps run untimed, `--steps` steps are timed (each step
starts after a barrier and lasts until the slowest rank finishes it; the median over steps is
reported), and its process groups are freed before the next plan. Measurements are saved as JSON (--out), so a
formula change is re-scored with --rescore without running anything again.

Then a confirmation: the predicted-best plan and the sweep's three fastest run again in a fresh
world, interleaved over three rounds (A B C D A B C D ...), five timed steps each. The sweep's
fastest plan is the minimum of ~100 noisy single measurements (biased low); the paired,
repeated re-measurement is what "the predicted best within 10% of the measured best" is judged on.

Plans and scores: perfmodel/validation.py (every runnable layout of 8 ranks with the knobs worth
trying, and the plans `axon tune` ranks highest).

Memory compared: model states + peak saved activations on the most loaded rank, i.e. plan.json's
`memory.measured` (params + grads + optimizer + activations: unique storages of the parameters,
gradient buckets and optimizer states, and the peak bytes autograd saved for backward during
the first step) against `memory.predicted` (the same four fields of perfmodel.memory.Memory).
Gathered-weight buffers and runtime overhead are not measured, so not compared.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from axon.config import RunConfig, freeze, load  # noqa: E402
from perfmodel.specs import Plan  # noqa: E402
from benchmarks.perfmodel_world import WORLD, plan_name, run_plans  # noqa: E402
from perfmodel.validation import (MEMORY_KEYS, Sweep, candidate_plans, confirm_candidates,  # noqa: E402
                                  confirmed_ratio, headline, predicted_best, score)

FIGURES = ROOT / "benchmarks" / "figures"


def base_config(run_dir: Path, overrides: list[str]) -> RunConfig:
    return freeze(load(["model=tiny", "cluster=local-cpu", "train.progress=false", "logger.wandb.mode=disabled",
                        "checkpoint.at_end=false", f"run.dir={run_dir}", *overrides]))


def sweep(cfg: RunConfig) -> Sweep:
    """The validation's setting: cfg's model and batch on WORLD ranks."""
    return Sweep(cfg.model, cfg.cluster, WORLD, cfg.train.global_batch_size, cfg.train.seq_len)


# ---- comparison ----
def report(rows: list[dict[str, Any]], verbose: bool) -> dict[str, float]:
    print(f"\n{'plan':<42} {'pred s':>8} {'meas s':>8} {'ratio':>6} {'pred MB':>8} {'meas MB':>8} {'ratio':>6}")
    for r in sorted(rows, key=lambda r: r["meas_s"]):
        print(f"{r['name']:<42} {r['pred_s']:8.3f} {r['meas_s']:8.3f} {r['pred_s'] / r['meas_s']:6.2f} "
              f"{r['pred_mem'] / 1e6:8.2f} {r['meas_mem'] / 1e6:8.2f} {r['pred_mem'] / r['meas_mem']:6.2f}")
        if verbose:
            parts = " ".join(f"{k}={r['pred_parts'][k] / 1e6:.2f}/{r['meas_parts'][k] / 1e6:.2f}" for k in MEMORY_KEYS)
            times = " ".join(f"{k[:-2]}={v:.3f}" for k, v in r["breakdown"].items() if v)
            print(f"    MB pred/meas: {parts}\n    s: {times}")
    h = headline(rows)
    picked = predicted_best(rows)
    best = min(rows, key=lambda r: r["meas_s"])
    print(f"\n{len(rows)} plans")
    print(f"step-time Spearman rank correlation: {h['spearman']:.3f} (goal >= 0.85, issue 19)")
    print(f"predicted-best plan: {picked['name']} measured {picked['meas_s']:.3f} s; measured best: "
          f"{best['name']} {best['meas_s']:.3f} s; ratio {h['best_ratio']:.3f} (goal <= 1.10)")
    print(f"peak memory per rank (model states + activations): {100 * h['mem_within_10pct']:.0f}% of plans "
          f"within 10%; median |error| {100 * h['mem_median_err']:.1f}%, worst {100 * h['mem_worst_err']:.1f}%")
    return h


def confirm(cfg: RunConfig, rows: list[dict[str, Any]], rounds: int, top: int, warmup: int, steps: int
            ) -> dict[str, list[float]]:
    """Re-measure the predicted-best plan beside the sweep's `top` fastest, interleaved over `rounds`
    rounds in one fresh world (plan A, B, C, A, B, C, ...), so they see the same load. The sweep's
    measured best is the minimum of ~100 noisy samples, biased low (a lucky plan wins); the
    paired re-measurement is what the <= 10% goal is judged on."""
    cands = confirm_candidates(rows, top)
    print(f"\nconfirmation: {len(cands)} plans x {rounds} rounds, {warmup} warm-up + {steps} timed steps each",
          flush=True)
    order = [Plan.from_dict(r["plan"]) for _ in range(rounds) for r in cands]
    times: dict[str, list[float]] = {r["name"]: [] for r in cands}
    for r in run_plans(cfg, order, warmup, steps, lambda done: None):
        times[plan_name(Plan.from_dict(r["plan"]))].append(r["step_time_s"])
    return times


def report_confirmation(rows: list[dict[str, Any]], times: dict[str, list[float]]) -> float | None:
    """Print the confirmation's medians; the confirmed ratio, or None when the saved confirmation
    was made for another predicted-best plan (re-run it: --confirm-rounds)."""
    picked = predicted_best(rows)["name"]
    if picked not in times:
        print(f"\nthe saved confirmation did not measure the current predicted best ({picked}): re-run it")
        return None
    ratio, best = confirmed_ratio(times, picked)
    print("\nconfirmation (median over rounds; rounds interleaved):")
    for name, ts in sorted(times.items(), key=lambda kv: statistics.median(kv[1])):
        mark = " <- predicted best" if name == picked else ""
        print(f"  {name:<42} {statistics.median(ts):7.3f} s  ({', '.join(f'{t:.3f}' for t in ts)}){mark}")
    print(f"predicted-best plan measured {ratio:.3f}x the fastest of the confirmed plans ({best}) (goal <= 1.10)")
    return ratio


def figures(rows: list[dict[str, Any]], headline: dict[str, float], tag: str) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e .[dev]); no figures", file=sys.stderr)
        return []
    FIGURES.mkdir(parents=True, exist_ok=True)
    paths = []
    for key, unit, scale, title in (("s", "s", 1.0, f"step time (Spearman {headline['spearman']:.2f})"),
                                    ("mem", "MB", 1e-6, "model states + peak activations per rank")):
        pred = [r[f"pred_{key}"] * scale for r in rows]
        meas = [r[f"meas_{key}"] * scale for r in rows]
        fig, ax = plt.subplots(figsize=(5.5, 5))
        lo, hi = min(pred + meas) * 0.8, max(pred + meas) * 1.25
        ax.fill_between([lo, hi], [lo * 0.9, hi * 0.9], [lo * 1.1, hi * 1.1], color="0.88", label="within 10%",
                        zorder=0)
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="predicted = measured", zorder=1)
        ax.scatter(meas, pred, s=14, zorder=2, label=f"{len(rows)} plans")
        ax.set(xscale="log", yscale="log", xlim=(lo, hi), ylim=(lo, hi), xlabel=f"measured ({unit})",
               ylabel=f"predicted ({unit})", title=f"tiny model, 8 gloo ranks: {title}")
        ax.title.set_fontsize(9)
        ax.legend(fontsize=8)
        path = FIGURES / f"perfmodel_validate_{'time' if key == 's' else 'memory'}{tag}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="six layouts x two variants (development, smoke)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "perfmodel_validate.json",
                    help="where the measurements are saved (JSON)")
    ap.add_argument("--rescore", type=Path, help="skip running: re-predict the measurements saved in this file")
    ap.add_argument("--resume", action="store_true", help="keep the plans already measured in --out, run the rest")
    ap.add_argument("--skip", action="append", default=[], metavar="PLAN",
                    help="leave out a plan by its printed name (one that hangs this build); repeatable")
    ap.add_argument("--confirm-rounds", type=int, metavar="N",
                    help="re-measure the predicted best beside the fastest plans, N interleaved rounds "
                         "(default 3 after a sweep; with --rescore the saved confirmation unless given; 0: none)")
    ap.add_argument("--confirm-top", type=int, default=3, help="fastest measured plans in the confirmation")
    ap.add_argument("--confirm-steps", type=int, default=5, help="timed steps per confirmation run")
    ap.add_argument("--verbose", action="store_true", help="memory parts and time breakdown per plan")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for the model / batch (e.g. train.seq_len=256)")
    args = ap.parse_args()
    if args.rescore:
        saved = json.loads(args.rescore.read_text())
        cfg = base_config(Path(tempfile.gettempdir()), saved["overrides"])
        results, quick = saved["results"], saved["quick"]
    else:
        cfg = base_config(Path(tempfile.mkdtemp(prefix="perfmodel_validate_")), args.overrides)
        plans, rejected = candidate_plans(sweep(cfg), args.quick)
        plans = [p for p in plans if plan_name(p) not in args.skip]
        kept = json.loads(args.out.read_text())["results"] if args.resume and args.out.exists() else []
        plans = [p for p in plans if p.to_dict() not in [r["plan"] for r in kept]]
        print(f"{len(plans)} runnable plans to run ({rejected} variants rejected by the checks, {len(kept)} "
              f"already measured, {len(args.skip)} skipped); model "
              f"{cfg.model.n_layers}x{cfg.model.d_model}, batch {cfg.train.global_batch_size} x "
              f"{cfg.train.seq_len} tokens; {args.warmup} warm-up + {args.steps} timed steps each", flush=True)
        t0 = time.perf_counter()
        args.out.parent.mkdir(parents=True, exist_ok=True)

        def save(done: list[dict[str, Any]]) -> None:
            args.out.write_text(json.dumps({"overrides": args.overrides, "quick": args.quick, "steps": args.steps,
                                            "results": done}, indent=1))

        results = kept + run_plans(cfg, plans, args.warmup, args.steps, lambda done: save(kept + done))
        print(f"measured in {time.perf_counter() - t0:.0f} s; saved to {args.out}")
        quick = args.quick
    rows = score(sweep(cfg), results, plan_name)
    headline = report(rows, args.verbose)
    source = args.rescore or args.out
    saved = json.loads(source.read_text())
    rounds = args.confirm_rounds if args.confirm_rounds is not None else (0 if args.rescore else 3)
    if rounds:
        saved["confirm"] = confirm(cfg, rows, rounds, args.confirm_top, args.warmup, args.confirm_steps)
        source.write_text(json.dumps(saved, indent=1))
    if saved.get("confirm"):
        report_confirmation(rows, saved["confirm"])
    for path in figures(rows, headline, "_quick" if quick else ""):
        print(f"figure: {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
