"""Catastrophic memorization at small scale, and the Goldfish loss against it.

    .venv/bin/python benchmarks/goldfish_memorization.py [--record] [--steps 250 --repeats 200 ...]

The training data is one novel of the embedded corpus plus a few "canary" documents (random
words from the corpus's vocabulary: unpredictable text) repeated many times, tokenized by the
public path, `axon prepare-data canaries_repeated.jsonl novel.txt --out ...`, and trained on
with `data.path=`. The same small model is trained twice, with the plain loss and with
`train.goldfish.k=4`, then `axon eval memorization` scores greedy continuations of the canaries
(and of as many held-out canaries from the same generator, the control) and the validation loss
on the novel's held-out tail. The two trainings run side by side (one process each). Writes a table, benchmarks/figures/goldfish_memorization.png and,
with --record, benchmarks/results/goldfish_<date>.md.
"""
from __future__ import annotations

import argparse
import datetime
import gzip
import json
import platform
import random
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from axon import eval_memorization  # noqa: E402
from axon.prepare_data import prepare  # noqa: E402

NOVEL = ROOT / "axon" / "corpus" / "6-persuasion.txt.gz"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "goldfish_bench", help="data and run directories")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--novel-chars", type=int, default=40_000, help="characters of the novel in the data")
    p.add_argument("--lr", type=float, default=8e-3)
    p.add_argument("--batch", type=int, default=8, help="train.global_batch_size (sequences of 128 bytes)")
    p.add_argument("--canaries", type=int, default=4, help="canary documents (and as many held out)")
    p.add_argument("--repeats", type=int, default=200, help="copies of each canary in the training data")
    p.add_argument("--words", type=int, default=16, help="words per canary")
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens (bytes)")
    p.add_argument("--length", type=int, default=32, help="generated tokens (bytes)")
    p.add_argument("--k", type=int, default=4, help="train.goldfish.k of the goldfish run")
    p.add_argument("--h", type=int, default=13, help="train.goldfish.h of the goldfish run")
    p.add_argument("--model", nargs="*", default=["model.n_layers=2", "model.d_model=128", "model.n_heads=4",
                                                  "model.n_kv_heads=4", "model.d_ff=512"])
    p.add_argument("--record", action="store_true", help="write benchmarks/results/goldfish_<date>.md")
    return p.parse_args(argv)


def canaries(n: int, words: int, seed: int, vocab: list[str]) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(vocab) for _ in range(words)) + "." for _ in range(n)]


def make_data(args: argparse.Namespace) -> Path:
    """canaries.jsonl, heldout.jsonl and the training token file made by `axon prepare-data`."""
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    novel = gzip.decompress(NOVEL.read_bytes()).decode("utf-8")[:args.novel_chars]
    (work / "novel.txt").write_text(novel)
    vocab = sorted(set(re.findall(r"[a-z]{3,9}", novel)))
    train, held = canaries(args.canaries, args.words, 0, vocab), canaries(args.canaries, args.words, 1, vocab)
    for name, docs in (("canaries", train), ("heldout", held), ("canaries_repeated", train * args.repeats)):
        (work / f"{name}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    # the novel last, so the validation split (the tail) is the novel's, with no canary in it
    prepare([work / "canaries_repeated.jsonl", work / "novel.txt"], work / "train", "byte")
    return work / "train.bin"


def train(args: argparse.Namespace, data: Path, name: str, extra: list[str]) -> subprocess.Popen:
    """Start `axon train` for one run (the runs go side by side: CPU-bound, each on its threads)."""
    run_dir = args.work / name
    cmd = [sys.executable, "-m", "axon.train", *args.model, f"data.path={data}", "data.val_fraction=0.05",
           f"train.steps={args.steps}", "train.seq_len=128", f"train.global_batch_size={args.batch}", f"train.lr={args.lr}",
           "train.log_every=50", "train.progress=false", "logger.wandb.mode=disabled", f"run.dir={run_dir}",
           "checkpoint.resume=never", *extra]
    print(" ".join(cmd[1:]), flush=True)
    return subprocess.Popen(cmd, cwd=ROOT)


def evaluate(args: argparse.Namespace, run_dir: Path) -> dict:
    ns = eval_memorization.parse_args([str(run_dir), "--n", str(args.canaries), "--prompt", str(args.prompt),
                                       "--length", str(args.length), "--train-docs", str(args.work / "canaries.jsonl"),
                                       "--heldout-docs", str(args.work / "heldout.jsonl")])
    return eval_memorization.run(ns)


def plot(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    names = list(results)
    for ax, metric, title in zip(axes, ("exact_match", "rouge_l"), ("exact match", "ROUGE-L")):
        x = range(len(names))
        ax.bar([i - 0.2 for i in x], [results[n]["train"][metric] for n in names], 0.4, label="canaries (trained on)")
        ax.bar([i + 0.2 for i in x], [results[n]["heldout"][metric] for n in names], 0.4, label="held-out canaries")
        ax.set_xticks(list(x), [f"{n}\nval loss {results[n]['val_loss']:.3f}" for n in names])
        ax.set_ylim(0, 1.05)
        ax.set_title(title)
    axes[0].legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def table(results: dict[str, dict]) -> str:
    rows = ["| loss | canaries exact match | canaries ROUGE-L | held-out exact match | held-out ROUGE-L | val loss |",
            "|---|---|---|---|---|---|"]
    for name, r in results.items():
        rows.append(f"| {name} | {r['train']['exact_match']:.3f} | {r['train']['rouge_l']:.3f} | "
                    f"{r['heldout']['exact_match']:.3f} | {r['heldout']['rouge_l']:.3f} | {r['val_loss']:.4f} |")
    return "\n".join(rows)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    data = make_data(args)
    runs = {"plain": [], f"goldfish k={args.k}": [f"train.goldfish.k={args.k}", f"train.goldfish.h={args.h}"]}
    dirs = {name: args.work / re.sub(r"\W", "", name) for name in runs}
    procs = [train(args, data, dirs[name].name, extra) for name, extra in runs.items()]
    if any(p.wait() for p in procs):
        raise SystemExit("a training run failed; see its output above")
    results = {name: evaluate(args, dirs[name]) for name in runs}
    text = table(results)
    print(text)
    fig = ROOT / "benchmarks" / "figures" / "goldfish_memorization.png"
    plot(results, fig)
    if args.record:
        day = datetime.date.today().isoformat()
        out = ROOT / "benchmarks" / "results" / f"goldfish_{day}.md"
        out.write_text(f"# Goldfish loss vs memorization ({day})\n\nCommand: `.venv/bin/python "
                       f"benchmarks/goldfish_memorization.py {' '.join(argv)}`\n\nMachine: {platform.machine()}, "
                       f"{platform.processor() or 'CPU'}, torch CPU, 1 process.\n\n{text}\n\n"
                       f"Prompt {args.prompt} bytes, continuation {args.length} bytes, {args.canaries} canaries "
                       f"x {args.repeats} copies, {args.steps} steps of {args.batch} x 128 bytes; figure: benchmarks/figures/"
                       f"goldfish_memorization.png\n\n```json\n{json.dumps(results, indent=2)}\n```\n")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
