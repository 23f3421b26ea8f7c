"""`axon eval memorization`: how much of its training text a model reproduces verbatim.

    axon eval memorization runs/<name> [--n 32 --prompt 32 --length 32]
        [--train-docs docs.jsonl --heldout-docs other.jsonl] [--json out.json]

For N training documents: prompt with the first P tokens, greedy-generate the next L
(axon/generate.py) and score them against the true continuation: exact match (all L tokens
right) and ROUGE-L (F-measure of the longest common subsequence; with equal lengths LCS / L).
The same on held-out documents is the control (what the model predicts without having seen the
text), and the validation loss of the run's data is reported beside. The documents are the
run's dataset's (split at the end-of-document token; the training split's, and the validation
split's as the control, evenly spaced windows when a split has too few documents), or the lines
of the given .jsonl files (their "text", tokenized with the run's tokenizer). Prints a table;
--json writes the numbers.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from axon.config import Data
from axon.data import TokenDataset, open_dataset
from axon.generate import greedy, load_model
from axon.model import GPT
from axon.tokenizer import load_tokenizer


# ---- metrics ----
def lcs_len(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common subsequence of a and b (dynamic programming, one row)."""
    row = [0] * (len(b) + 1)
    for x in a:
        prev = 0  # row[j-1] of the previous row
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], prev + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(generated: Sequence[int], reference: Sequence[int]) -> float:
    """ROUGE-L F-measure: the harmonic mean of LCS / len(generated) and LCS / len(reference)."""
    lcs = lcs_len(generated, reference)
    if lcs == 0:
        return 0.0
    p, r = lcs / len(generated), lcs / len(reference)
    return 2 * p * r / (p + r)


def score(model: GPT, docs: list[np.ndarray], prompt: int, length: int) -> dict[str, float]:
    """Exact-match rate and mean ROUGE-L of greedy continuations of `docs` (each >= prompt + length)."""
    if not docs:
        return {"n": 0, "exact_match": float("nan"), "rouge_l": float("nan")}
    batch = torch.as_tensor(np.stack([d[:prompt + length] for d in docs]).astype(np.int64))  # [N, P+L]
    out = greedy(model, batch[:, :prompt], length)  # [N, L]
    truth = batch[:, prompt:]  # [N, L]
    exact = (out == truth).all(1).float().mean().item()
    rl = float(np.mean([rouge_l(g.tolist(), t.tolist()) for g, t in zip(out, truth)]))
    return {"n": len(docs), "exact_match": exact, "rouge_l": rl}


@torch.no_grad()
def val_loss(model: GPT, tokens: np.ndarray, seq_len: int, max_windows: int = 64) -> float:
    """Mean next-token cross-entropy over up to `max_windows` windows of seq_len + 1 tokens."""
    n = min(len(tokens) // (seq_len + 1), max_windows)
    if n == 0:
        raise ValueError(f"the validation split holds fewer than train.seq_len + 1 = {seq_len + 1} tokens; "
                         f"raise data.val_fraction")
    w = torch.as_tensor(np.asarray(tokens[:n * (seq_len + 1)], dtype=np.int64)).view(n, seq_len + 1)  # [n, S+1]
    losses = [F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).item() for x in w.split(8)]
    sizes = [len(x) for x in w.split(8)]
    return float(np.average(losses, weights=sizes))


# ---- documents ----
def documents(ds: TokenDataset, n: int, need: int) -> list[np.ndarray]:
    """Up to n documents of `ds` with at least `need` tokens (split at its end-of-document
    token); evenly spaced windows of `need` tokens when it has fewer such documents."""
    toks = np.asarray(ds.tokens)
    docs: list[np.ndarray] = []
    if ds.eot_id is not None:
        cuts = np.flatnonzero(toks == ds.eot_id)
        docs = [d for d in np.split(toks, cuts + 1) if len(d) >= need]
        docs = [d[d != ds.eot_id] if d[-1] == ds.eot_id else d for d in docs]
        docs = [d for d in docs if len(d) >= need]
    if len(docs) >= n:
        return docs[:n]
    starts = np.linspace(0, len(toks) - need, n).astype(np.int64) if len(toks) >= need else []
    return [toks[s:s + need] for s in starts]


def jsonl_documents(path: Path, tokenizer: str, need: int) -> list[np.ndarray]:
    """The "text" of each line of `path`, tokenized; those shorter than `need` tokens are skipped."""
    tok = load_tokenizer(tokenizer)
    texts = [json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()]
    return [ids for ids in tok.encode_batch(texts) if len(ids) >= need]


# ---- the command ----
def evaluate(model: GPT, train_docs: list[np.ndarray], heldout_docs: list[np.ndarray], val_tokens: np.ndarray,
             prompt: int, length: int, seq_len: int) -> dict:
    return {"prompt": prompt, "length": length, "train": score(model, train_docs, prompt, length),
            "heldout": score(model, heldout_docs, prompt, length), "val_loss": val_loss(model, val_tokens, seq_len)}


def table(result: dict) -> str:
    lines = [f"{'documents':<10} {'n':>4} {'exact match':>12} {'ROUGE-L':>8}"]
    for key in ("train", "heldout"):
        r = result[key]
        lines.append(f"{key:<10} {r['n']:>4} {r['exact_match']:>12.3f} {r['rouge_l']:>8.3f}")
    lines.append(f"validation loss {result['val_loss']:.4f} (prompt {result['prompt']}, continuation "
                 f"{result['length']} tokens)")
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="axon eval memorization", description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="run directory (runs/<name>): its config.yaml and newest checkpoint")
    p.add_argument("--checkpoint", type=Path, default=None, help="a step_* directory (default: the newest)")
    p.add_argument("--n", type=int, default=32, help="documents of each kind")
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens P")
    p.add_argument("--length", type=int, default=32, help="generated tokens L")
    p.add_argument("--train-docs", type=Path, default=None, help=".jsonl of training documents (default: the run's)")
    p.add_argument("--heldout-docs", type=Path, default=None, help=".jsonl of held-out documents")
    p.add_argument("--json", type=Path, default=None, help="write the result here")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    raw = OmegaConf.to_container(OmegaConf.load(args.run / "config.yaml"), resolve=True)
    data = Data(**raw["data"])
    model = load_model(args.checkpoint or args.run / "checkpoints")
    ds = open_dataset(data, vocab_size=model.spec.vocab_size)
    need = args.prompt + args.length
    train = (jsonl_documents(args.train_docs, ds.tokenizer, need) if args.train_docs
             else documents(ds.split("train"), args.n, need))[:args.n]
    held = (jsonl_documents(args.heldout_docs, ds.tokenizer, need) if args.heldout_docs
            else documents(ds.split("val"), args.n, need))[:args.n]
    return evaluate(model, train, held, ds.split("val").tokens, args.prompt, args.length, raw["train"]["seq_len"])


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):
        parse_args(["--help"])  # prints the usage and exits 0
    if argv[:1] != ["memorization"]:  # `axon eval memorization ...` (the one evaluation so far)
        print("axon eval: name the evaluation: axon eval memorization runs/<name> [options]", file=sys.stderr)
        return 2
    args = parse_args(argv[1:])
    try:
        result = run(args)
    except (ValueError, OSError, RuntimeError) as err:
        print(f"axon eval memorization: error: {err}", file=sys.stderr)
        return 1
    print(table(result))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0
