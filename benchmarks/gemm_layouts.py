"""GEMM layout tuning's decision table (kernels/gemm_tuning.py) on this machine: for each Linear shape of
the tiny model (configs/model/tiny.yaml, head included) and of one Llama-3-8B-shaped layer
(configs/model/llama3-8b.yaml: d 4096, d_ff 14336, 8 KV heads), the time of each of the 8
formulations of its forward, input-gradient and weight-gradient GEMMs, the one chosen, and its
speed-up over torch's own formulation (`gemm.DEFAULT`).

    .venv/bin/python benchmarks/gemm_layouts.py                         # tiny + 8B layer, fp32 and bf16
    .venv/bin/python benchmarks/gemm_layouts.py --models llama3-8b --dtypes bf16 --tokens-8b 2048 --device cuda

Per (shape, role) `GemmTable.tune` runs each formulation `--warmup` times, then takes the median
of `--reps` timed runs; a formulation other than torch's is chosen only when it beats torch's by
more than 3%. Where the choice differs, both are timed again (`--reps` interleaved pairs, median):
the "re-timed" speed-up, the one to trust on a shared machine. The per-model line weighs each
shape by how many of the model's Linears have it: the GEMM time of a training step's Linears
(forward + both gradients) with the chosen layouts over torch's.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from kernels import gemm, gemm_tuning  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "model"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def linear_shapes(name: str, tokens: int) -> dict[tuple[int, int, int], int]:
    """(tokens, out, in) -> how many Linears have it: one layer of configs/model/<name>.yaml, and
    for the tiny model all its layers and the head."""
    cfg = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    d, ff, heads = cfg["d_model"], cfg["d_ff"], cfg["n_heads"]
    kv = cfg.get("n_kv_heads", heads) * d // heads
    layer = [(d, d), (kv, d), (kv, d), (d, d), (ff, d), (ff, d), (d, ff)]  # wq wk wv wo, gate up down
    linears = layer * cfg["n_layers"] + [(cfg["vocab_size"], d)] if name == "tiny" else layer
    counts: dict[tuple[int, int, int], int] = {}
    for n, k in linears:
        counts[(tokens, n, k)] = counts.get((tokens, n, k), 0) + 1
    return counts


def paired(role: str, forms: tuple[str, str], shape: tuple[int, int, int], device: torch.device,
           dtype: torch.dtype, reps: int) -> list[float]:
    """Median microseconds of each of `forms`, timed again in turns on fresh operands."""
    m, n, k = shape
    ops = [torch.randn(s, device=device, dtype=dtype) for s in ((m, k), (n, k), (m, n))]
    return gemm_tuning.medians_us([gemm_tuning.role_call(role, f, *ops) for f in forms], device, 1, reps)


def report(name: str, counts: dict, dtype_name: str, device: torch.device, warmup: int, reps: int) -> list[str]:
    dtype = DTYPES[dtype_name]
    table = gemm_tuning.GemmTable(gemm_tuning.device_key(device))
    t0 = time.perf_counter()
    table.tune(counts, device, dtype, warmup=warmup, reps=reps)
    tuned_s = time.perf_counter() - t0
    lines = [f"### {name}, {dtype_name}, {len(counts)} shapes ({sum(counts.values())} Linears), "
             f"tuned in {tuned_s:.1f} s", "",
             "| role | m | n | k | " + " | ".join(gemm.FORMS) + " | torch's | chosen | speed-up | re-timed |",
             "|---|---|---|---|" + "---|" * len(gemm.FORMS) + "---|---|---|---|"]
    total = {"torch": 0.0, "chosen": 0.0}
    for (m, n, k), count in sorted(counts.items()):
        for role in gemm.ROLES:
            key = (role, m, n, k, gemm_tuning.dtype_name(dtype))
            times = table.times[(table.device, table.version, key)]
            chosen, default = table.entries[(table.device, table.version, key)], gemm.DEFAULT[role]
            speed = times[default] / times[chosen]
            retimed, t_default, t_chosen = "", times[default], times[default]
            if chosen != default:
                t_default, t_chosen = paired(role, (default, chosen), (m, n, k), device, dtype, reps)
                retimed = f"{t_default / t_chosen:.2f}"
            total["torch"] += count * t_default
            total["chosen"] += count * t_chosen
            cells = " | ".join(f"**{times[f]:.0f}**" if f == chosen else f"{times[f]:.0f}" for f in gemm.FORMS)
            lines.append(f"| {role} | {m} | {n} | {k} | {cells} | {default} | {chosen} | {speed:.2f} | {retimed} |")
    lines += ["", f"{name} {dtype_name}: the Linears' GEMM time of a step, torch's layouts / chosen "
                  f"(re-timed where they differ): {total['torch'] / total['chosen']:.3f}", ""]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["tiny", "llama3-8b"], choices=["tiny", "llama3-8b"])
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    ap.add_argument("--tokens-tiny", type=int, default=2048, help="rows per GEMM for the tiny model (16 x 128)")
    ap.add_argument("--tokens-8b", type=int, default=512, help="rows per GEMM for the 8B layer")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads (default torch's; 1 on a shared machine: no thread waits on a descheduled one)")
    a = ap.parse_args()
    device = torch.device(a.device)
    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"device: {gemm_tuning.device_key(device)}; torch {torch.__version__}; threads {torch.get_num_threads()}; "
          f"times in microseconds (median of {a.reps} after {a.warmup} warm-up), the chosen in bold")
    for name in a.models:
        counts = linear_shapes(name, a.tokens_tiny if name == "tiny" else a.tokens_8b)
        for dtype_name in a.dtypes:
            print("\n".join(report(name, counts, dtype_name, device, a.warmup, a.reps)), flush=True)


if __name__ == "__main__":
    main()
