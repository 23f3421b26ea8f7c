"""Measured activation bytes per rank under bf16 against fp32: one rank of ZeRO-3 dp=8 and of
pp=4 1F1B (stage 0) over torch's fake process group, one trainer step each; and the bf16 model
states per parameter of dp=8 under ZeRO 0-3 against Megatron's, the ZeRO paper's and FSDP2's.

    .venv/bin/python benchmarks/bf16_memory.py
    .venv/bin/python benchmarks/bf16_memory.py --layers 8 --width 512 --seq 128

Each row builds `axon.trainer.Trainer` (8 layers, width 512 by default) as rank 0 of the layout
and runs one step with activation tracking (the pipeline's `ActivationStore`: saved-tensor hooks,
unique saved tensors that are neither parameters nor compute weights, plus the split backward's W
stash), then reports the peak bytes and the model-state bytes (`axon.memory`: unique storages of
the engine's parameters, gradients and optimizer states). With fake collectives the data is not
exchanged, so losses are meaningless; bytes are exact. A bf16 weight copy that autograd saves
is counted as an activation unless it is a registered compute weight: under autocast alone
(before parallel/precision.py) every microbatch's copies were counted.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

LAYOUTS = {"zero3 dp=8": (8, ["parallel.dp=8", "parallel.zero=3", "train.global_batch_size=32"]),
           "pp=4 1f1b stage 0": (4, ["parallel.pp=4", "parallel.schedule=1f1b", "train.global_batch_size=16"])}
# model states per parameter under bf16 against the convention of the library a user would pick
# for the same memory schedule (d = 8): Megatron's bf16 DDP (2 + 4 + 4 + 8) and distributed optimizer
# (2 + 4 + 12/d), the ZeRO paper's stage 2 (2 + (2 + 12)/d: 16-bit gradients), FSDP2's fp32 sharded
# parameters under a bf16 MixedPrecisionPolicy ((4 + 4 + 8)/d; the bf16 copy is gathered per use)
STATES = {"dp=8": (["parallel.dp=8"], "Megatron DDP", 18.0),
          "zero1 dp=8": (["parallel.dp=8", "parallel.zero=1"], "Megatron distributed optimizer", 2 + 4 + 12 / 8),
          "zero2 dp=8": (["parallel.dp=8", "parallel.zero=2"], "ZeRO paper stage 2", 2 + 14 / 8),
          "zero3 dp=8": (["parallel.dp=8", "parallel.zero=3"], "FSDP2", 16 / 8)}


def _fake_world(world: int) -> None:
    """Rank 0 of `world` over torch's fake process group; torch 2.13 registers the "fake" backend
    only when its testing module is imported, so the private module is the one route."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)


def measure(world: int, overrides: list[str], run_dir: Path) -> dict[str, int]:
    from axon import memory, trainer
    from axon.config import freeze, load
    from launch.grid import Grid

    cfg = freeze(load(["model=tiny", "train.progress=false", "logger.wandb.mode=disabled", f"run.dir={run_dir}",
                       "checkpoint.at_end=false", "optim.grad_clip=0",
                       "train.on_nonfinite=skip", *overrides]))
    _fake_world(world)
    try:
        t = trainer.Trainer(cfg, Grid.build(cfg.plan, 0, world), torch.device("cpu"))
        t.step(0)
        t.engine.create_states()  # creates Adam states a skipped step left uncreated (fake data can overflow)
        out = {"activations": t.pipe.last_memory.peak_device_bytes,
               "gathered": getattr(t.engine.reset_stats(), "bytes_gathered", 0),  # ZeRO all-gathers of the step
               "n_params": sum(p.numel() for c in t.pipe.chunks.values() for p in c.parameters()),  # this rank's
               **memory.model_state_bytes(t.engine.state_tensors())}
        t.engine.remove()
        return out
    finally:
        dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    a = ap.parse_args()
    model = [f"model.n_layers={a.layers}", f"model.d_model={a.width}", "model.n_heads=8", "model.n_kv_heads=4",
             f"model.d_ff={a.width * 8 // 3 // 8 * 8}", f"train.seq_len={a.seq}", "parallel.micro_batch_size=2"]
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (world, layout) in LAYOUTS.items():
            for dtype in ("fp32", "bf16"):
                run = Path(tmp) / f"run{len(rows)}"
                rows[(name, dtype)] = measure(world, [*model, *layout, f"train.dtype={dtype}"], run)
    print(f"layers={a.layers} width={a.width} seq={a.seq} micro_batch_size=2, one rank over the fake process group")
    print("| layout | fp32 activations MiB | bf16 activations MiB | bf16 / fp32 | fp32 params+grads+optim MiB "
          "| bf16 params+grads+optim MiB | fp32 / bf16 gathered MiB |")
    print("|---|---|---|---|---|---|---|")
    for name in LAYOUTS:
        f, b = rows[(name, "fp32")], rows[(name, "bf16")]
        states = [sum(r.get(k, 0) for k in ("params", "grads", "optimizer")) / 2**20 for r in (f, b)]
        print(f"| {name} | {f['activations'] / 2**20:.2f} | {b['activations'] / 2**20:.2f} | "
              f"{b['activations'] / f['activations']:.2f} | {states[0]:.2f} | {states[1]:.2f} | "
              f"{f['gathered'] / 2**20:.2f} / {b['gathered'] / 2**20:.2f} |")
    print()
    print("bf16 model states (params + grads + optimizer) per parameter, one rank of 8:")
    print("| layout | measured bytes / param | peer | peer bytes / param | ours / peer |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, (layout, peer, peer_bytes) in STATES.items():
            run = Path(tmp) / f"states{len(rows)}"
            got = measure(8, [*model, *layout, "train.global_batch_size=32", "train.dtype=bf16"], run)
            per = sum(got.get(k, 0) for k in ("params", "grads", "optimizer")) / got["n_params"]
            rows[(name, "bf16 states")] = got
            print(f"| {name} | {per:.3f} | {peer} | {peer_bytes:.3f} | {per / peer_bytes:.3f} |")
    if a.json is not None:
        a.json.write_text(json.dumps({f"{n}|{d}": v for (n, d), v in rows.items()}, indent=1))


if __name__ == "__main__":
    main()
