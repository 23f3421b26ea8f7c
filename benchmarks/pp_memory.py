"""Measured peak activation memory per pipeline rank against the schedule simulator's prediction.

    PYTHONPATH=. .venv/bin/python benchmarks/pp_memory.py                 # pp=4, 8 microbatches
    PYTHONPATH=. .venv/bin/python benchmarks/pp_memory.py --pp 4 --microbatches 16

Spawns `pp` gloo ranks; each runs one training step of every schedule below and reports the peak
bytes held by the saved-tensor hooks (plus the W stash of split backwards) on the device and the
peak bytes offloaded to host memory (`parallel.activation_offload.ActivationStore`). The unit is
one microbatch through one full stage, measured as the bytes one F of a middle 1F1B stage saves;
the predicted bytes are the simulator's peak (perfmodel.schedule_sim, in those units) times it.
The first / last chunk also hold the embedding / head-and-loss activations, so the ranks holding
them read a little above the prediction. A second table gives the busiest rank's device peak in
units of one microbatch through the whole model (pp units), comparable across --pp: with 1F1B it
stays about 1 at any depth, with PipeOffload it falls as stages are added.
"""
from __future__ import annotations

import argparse

import torch.distributed as dist

from benchmarks.pp_common import build_pipeline, microbatches, plan_for
from launch.grid import Grid
from launch.local import spawn
from parallel.head_loss import fused
from perfmodel import schedules
from perfmodel.schedule_sim import simulate
from perfmodel.specs import ModelSpec

ROWS = [("1f1b", 0.0), ("vhalf", 0.0), ("vmin", 0.0), ("zbv", 0.0), ("zbh1", 0.0),
        ("1f1b", 0.25), ("1f1b", 0.5), ("1f1b", 1.0), ("zbv", 0.5)]


def _spec(layers: int) -> ModelSpec:
    return ModelSpec(n_layers=layers, d_model=128, n_heads=4, n_kv_heads=2, d_ff=344, vocab_size=256)


def _rank(pp: int, m: int, seq: int, layers: int) -> list[dict]:
    """One step of gpipe (the unit) and of every row; the first entry is a warm-up run."""
    spec, out = _spec(layers), []
    grid = Grid.build(plan_for(pp, "1f1b"), dist.get_rank(), dist.get_world_size())
    for schedule, frac in [("1f1b", 0.0), ("gpipe", 0.0)] + ROWS:
        pipe = build_pipeline(spec, plan_for(pp, schedule, offload=frac), grid, seq)
        pipe.step(microbatches(spec, m, 1, seq, 0), fused, m * seq, None, track_memory=True)
        out.append({"schedule": schedule, "offload": frac, "device": pipe.last_memory.peak_device_bytes,
                    "host": pipe.last_memory.peak_host_bytes})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pp", type=int, default=4)
    ap.add_argument("--microbatches", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--layers", type=int, default=16)
    a = ap.parse_args()
    per_rank = spawn(a.pp, _rank, a.pp, a.microbatches, a.seq, a.layers)
    # one full-stage microbatch: gpipe's middle rank holds all m microbatches at its peak
    unit = per_rank[a.pp // 2][1]["device"] / a.microbatches
    print(f"pp={a.pp} microbatches={a.microbatches} seq={a.seq} layers={a.layers} d_model=128 fp32; "
          f"unit (one microbatch x one stage) = {unit / 2**20:.2f} MiB")
    print("| schedule | offload | rank | measured device MiB | predicted MiB (sim units) | measured / predicted "
          "| measured host MiB | predicted host MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for i, (schedule, frac) in enumerate(ROWS, start=2):
        sim = simulate(schedules.build(schedule, a.pp, a.microbatches, 2 if schedule in schedules.V_SHAPED else 1,
                                       frac))
        for r in range(a.pp):
            row = per_rank[r][i]
            pred, host = sim.peak_activations[r], sim.peak_offloaded[r]
            print(f"| {schedule} | {frac} | {r} | {row['device'] / 2**20:.2f} | {pred * unit / 2**20:.2f} ({pred:g}) | "
                  f"{row['device'] / (pred * unit):.2f} | {row['host'] / 2**20:.2f} | {host * unit / 2**20:.2f} |")
    # across pipeline depths: the busiest rank's device peak in whole-model microbatches (pp units)
    print(f"\nbusiest rank, pp={a.pp}: device peak / one microbatch through the whole model")
    print("| schedule | offload | max device MiB | in whole-model microbatches |")
    print("|---|---|---|---|")
    for i, (schedule, frac) in enumerate(ROWS, start=2):
        peak = max(per_rank[r][i]["device"] for r in range(a.pp))
        print(f"| {schedule} | {frac} | {peak / 2**20:.2f} | {peak / (unit * a.pp):.2f} |")


if __name__ == "__main__":
    main()
