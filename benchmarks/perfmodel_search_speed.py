"""How long `parallel=auto` / `axon tune` take to search every layout of a large run.

    .venv/bin/python benchmarks/perfmodel_search_speed.py                  # 405B, 4,096 and 32,768 H100s
    .venv/bin/python benchmarks/perfmodel_search_speed.py --worlds 1024 --layers 126 128

For each world size and layer count (Llama 3.1 405B's shape otherwise; global batch 2,048 x 8,192
tokens on the dgx-h100 preset) it runs one search in a fresh process-wide cache and prints the
CPU seconds it took (process time: hardly moved by other load on the machine), the layouts that
passed the shape rules, the plans whose step time was computed, and the best plan's predicted
step time. Layer counts with many divisors (128) used to take far longer than 126.
"""
from __future__ import annotations

import argparse
import time

from axon.config import freeze, load
from perfmodel.search import clear_caches, search


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worlds", type=int, nargs="+", default=[4096, 32768])
    p.add_argument("--layers", type=int, nargs="+", default=[126, 128])
    args = p.parse_args()
    print("| devices | layers | CPU s | layouts | plans timed | best step s | best layout (dp, pp, cp, tp_col, tp_row, tp_depth) |")
    print("|---|---|---|---|---|---|---|")
    for world in args.worlds:
        for layers in args.layers:
            clear_caches()  # each search pays for its own simulations, splits and placements
            cfg = freeze(load(["model=llama3.1-405b", "cluster=dgx-h100", f"model.n_layers={layers}"]))
            t = time.process_time()
            res = search(cfg.model, cfg.cluster, world, {}, global_batch_size=2048, seq_len=8192)
            cpu = time.process_time() - t
            best = res.estimates[0]
            degrees = tuple(getattr(best.plan, a) for a in ("dp", "pp", "cp", "tp_col", "tp_row", "tp_depth"))
            print(f"| {world} | {layers} | {cpu:.1f} | {res.layouts} | {res.candidates} | {best.step_time_s:.3f} | "
                  f"{degrees} |", flush=True)


if __name__ == "__main__":
    main()
