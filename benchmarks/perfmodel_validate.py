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

Plans (see `variants`): every factorisation of 8 into dp x pp x cp x tp_col x tp_row x tp_depth
that the model, the batch and this build allow, each with 1F1B, one microbatch per stage, no
ZeRO, no recomputation; with tp_col > 1 also sequence parallelism, with cp > 1 also Ulysses.
The four pure data x pipeline layouts also run at micro-batch 1 and 2, with ZeRO 1-3, full and
selective recomputation and every other schedule (GPipe, zbh1; with an even number of layers
per stage interleaved, zbv, vhalf, vmin with 2 chunks). Variants the checks reject are skipped.
Last, the plans `axon tune` ranks highest (the search's best plan for each of its ten best
layouts, over every knob it searches), so the plan the search would pick is always measured.

Memory compared: model states + peak saved activations on the most loaded rank, i.e. plan.json's
`memory.measured` (params + grads + optimizer + activations: unique storages of the parameters,
gradient buckets and optimizer states, and the peak bytes autograd saved for backward during
the first step) against `memory.predicted` (the same four fields of perfmodel.memory.Memory).
Gathered-weight buffers and runtime overhead are not measured, so not compared.
"""
from __future__ import annotations

import argparse
import itertools
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
from axon.train import check_runnable  # noqa: E402
from benchmarks.perfmodel_world import MEMORY_KEYS, WORLD, plan_name, run_plans  # noqa: E402
from perfmodel.estimate import estimate  # noqa: E402
from perfmodel.search import search  # noqa: E402
from perfmodel.specs import AXES, Plan, PlanError  # noqa: E402

SEARCH_TOP = 10  # the search's picks added to the plan set
FIGURES = ROOT / "benchmarks" / "figures"
QUICK = ({"dp": 8}, {"pp": 2, "dp": 4}, {"tp_col": 2, "dp": 4}, {"cp": 2, "dp": 4}, {"pp": 8},
         {"tp_col": 2, "tp_row": 2, "tp_depth": 2})


def base_config(run_dir: Path, overrides: list[str]) -> RunConfig:
    return freeze(load(["model=tiny", "cluster=local-cpu", "train.progress=false", "logger.wandb.mode=disabled",
                        "checkpoint.at_end=false", f"run.dir={run_dir}", *overrides]))


def why_not(cfg: RunConfig, plan: Plan) -> str | None:
    """None when this build runs `plan`, else the reason (the checks `axon train` makes)."""
    try:
        plan.check(cfg.model, WORLD, cfg.train.global_batch_size, cfg.train.seq_len)
        check_runnable(cfg.model, plan)
        estimate(cfg.model, plan, cfg.cluster, cfg.train.global_batch_size, cfg.train.seq_len)
    except PlanError as e:
        return str(e)
    return None


def layouts(world: int) -> list[dict[str, int]]:
    """Every assignment of degrees to the six axes whose product is `world`."""
    divs = [d for d in range(1, world + 1) if world % d == 0]
    out = []
    for degs in itertools.product(divs, repeat=len(AXES)):
        if _prod(degs) == world:
            out.append(dict(zip(AXES, degs)))
    return out


def _prod(xs: Any) -> int:
    n = 1
    for x in xs:
        n *= x
    return n


def variants(deg: dict[str, int], n_layers: int, global_batch_size: int) -> list[Plan]:
    """The plans tried for one layout (invalid or unbuilt ones are filtered later). First the
    layout with one microbatch per pipeline stage (mbs = batch / (data shards x pp): the fewest
    latency-bound collectives), then, for tensor / context layouts, sequence parallelism and
    Ulysses; for pure data x pipeline layouts (cheap to run) every other knob at mbs 1:
    mbs 2, the other schedules, ZeRO 1-3 (dp > 1), full and selective recomputation."""
    base = Plan(**deg)
    out = [base.replace(micro_batch_size=max(1, global_batch_size // (base.data_shards * base.pp)))]
    if base.tp > 1 or base.cp > 1:
        if base.tp_col > 1:
            out.append(out[0].replace(sequence_parallel=True))
        if base.cp > 1:
            out.append(out[0].replace(cp_mode="ulysses"))
        return out
    out += [base, base.replace(micro_batch_size=2), base.replace(recompute="full"),
            base.replace(recompute="selective")]
    if base.dp > 1:
        out += [base.replace(zero=z) for z in (1, 2, 3)]
    if base.pp > 1:
        out += [base.replace(schedule="gpipe"), base.replace(schedule="zbh1")]
        if (n_layers // base.pp) % 2 == 0:
            out += [base.replace(schedule=s, virtual_stages=2) for s in ("interleaved", "zbv", "vhalf", "vmin")]
    return out


def candidate_plans(cfg: RunConfig, quick: bool) -> tuple[list[Plan], int]:
    """(runnable plans, plans rejected by the checks)."""
    degs = [{**{a: 1 for a in AXES}, **q} for q in QUICK] if quick else layouts(WORLD)
    seen, plans, rejected = set(), [], 0
    for deg in degs:
        tried = variants(deg, cfg.model.n_layers, cfg.train.global_batch_size)
        for plan in (tried[:2] if quick else tried):
            if plan in seen:
                continue
            seen.add(plan)
            if why_not(cfg, plan) is None:
                plans.append(plan)
            else:
                rejected += 1
    if not quick:  # and what `axon tune` would pick: the search's best plan of each of its top layouts
        found = search(cfg.model, cfg.cluster, WORLD, None, cfg.train.global_batch_size, cfg.train.seq_len,
                       top=SEARCH_TOP)
        for plan in (e.plan for e in found.estimates):
            if plan not in seen and why_not(cfg, plan) is None:
                seen.add(plan)
                plans.append(plan)
    return plans, rejected


# ---- comparison ----
def _ranks(xs: list[float]) -> list[float]:
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    r = [0.0] * len(xs)
    i = 0
    while i < len(order):  # ties share their average rank
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            r[order[k]] = (i + j) / 2
        i = j + 1
    return r


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = _ranks(a), _ranks(b)
    ma, mb = statistics.fmean(ra), statistics.fmean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    return cov / (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5


def score(cfg: RunConfig, results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each measurement beside the current model's prediction."""
    rows = []
    for r in results:
        plan = Plan.from_dict(r["plan"])
        e = estimate(cfg.model, plan, cfg.cluster, cfg.train.global_batch_size, cfg.train.seq_len)
        pred_mem = sum(getattr(e.memory, k) for k in MEMORY_KEYS)
        meas_mem = sum(r["memory"][k] for k in MEMORY_KEYS)
        rows.append({"name": plan_name(plan), "plan": r["plan"], "pred_s": e.step_time_s, "meas_s": r["step_time_s"],
                     "pred_mem": pred_mem, "meas_mem": meas_mem, "pred_parts": {k: getattr(e.memory, k) for k in
                                                                              MEMORY_KEYS},
                     "meas_parts": {k: r["memory"][k] for k in MEMORY_KEYS}, "breakdown": e.breakdown})
    return rows


def report(rows: list[dict[str, Any]], verbose: bool) -> dict[str, float]:
    print(f"\n{'plan':<42} {'pred s':>8} {'meas s':>8} {'ratio':>6} {'pred MB':>8} {'meas MB':>8} {'ratio':>6}")
    for r in sorted(rows, key=lambda r: r["meas_s"]):
        print(f"{r['name']:<42} {r['pred_s']:8.3f} {r['meas_s']:8.3f} {r['pred_s'] / r['meas_s']:6.2f} "
              f"{r['pred_mem'] / 1e6:8.2f} {r['meas_mem'] / 1e6:8.2f} {r['pred_mem'] / r['meas_mem']:6.2f}")
        if verbose:
            parts = " ".join(f"{k}={r['pred_parts'][k] / 1e6:.2f}/{r['meas_parts'][k] / 1e6:.2f}" for k in MEMORY_KEYS)
            times = " ".join(f"{k[:-2]}={v:.3f}" for k, v in r["breakdown"].items() if v)
            print(f"    MB pred/meas: {parts}\n    s: {times}")
    rho = spearman([r["pred_s"] for r in rows], [r["meas_s"] for r in rows])
    picked = predicted_best(rows)
    best = min(rows, key=lambda r: r["meas_s"])
    mem_err = sorted(abs(r["pred_mem"] / r["meas_mem"] - 1) for r in rows)
    within = sum(e <= 0.10 for e in mem_err) / len(rows)
    print(f"\n{len(rows)} plans")
    print(f"step-time Spearman rank correlation: {rho:.3f} (goal >= 0.8)")
    print(f"predicted-best plan: {picked['name']} measured {picked['meas_s']:.3f} s; measured best: "
          f"{best['name']} {best['meas_s']:.3f} s; ratio {picked['meas_s'] / best['meas_s']:.3f} (goal <= 1.10)")
    print(f"peak memory per rank (model states + activations): {100 * within:.0f}% of plans within 10%; "
          f"median |error| {100 * statistics.median(mem_err):.1f}%, worst {100 * mem_err[-1]:.1f}%")
    return {"spearman": rho, "best_ratio": picked["meas_s"] / best["meas_s"], "mem_within_10pct": within,
            "mem_median_err": statistics.median(mem_err), "mem_worst_err": mem_err[-1]}


def predicted_best(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return min(rows, key=lambda r: r["pred_s"])


def confirm_candidates(rows: list[dict[str, Any]], top: int) -> list[dict[str, Any]]:
    """The plans the confirmation re-measures: the predicted best, then the `top` fastest measured."""
    picked = predicted_best(rows)
    out = [picked]
    for r in sorted(rows, key=lambda r: r["meas_s"])[:top]:
        if r["name"] != picked["name"]:
            out.append(r)
    return out


def confirmed_ratio(times: dict[str, list[float]], picked: str) -> tuple[float, str]:
    """(median time of `picked` / the lowest median, the plan with that median) over the
    confirmation's rounds (`times`: plan name -> one step time per round)."""
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    best = min(medians, key=medians.__getitem__)
    return medians[picked] / medians[best], best


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
        plans, rejected = candidate_plans(cfg, args.quick)
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
    rows = score(cfg, results)
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
