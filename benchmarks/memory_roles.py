"""Measured memory against the performance model: (1) activation bytes per layer against
Korthikanti et al.'s formula, under each recomputation mode, with and without tensor + sequence
parallelism; (2) bytes per role (params, grads, optimizer, activations, buffers) on one rank of
each 8-rank layout family, measured against `perfmodel.estimate.evaluate`.

    .venv/bin/python benchmarks/memory_roles.py
    .venv/bin/python benchmarks/memory_roles.py --width 256 --seq 128 --json out.json

Every row builds `axon.trainer.Trainer` as rank 0 of the layout over torch's fake process group
(collectives move no data: losses are meaningless, bytes are exact) in the trainer's bf16
(parallel/precision.py) or fp32.

Table 1 runs the rank's real, parallelized chunk (TP, SP, recomputation applied) forward on one
microbatch under `axon.memory.ActivationMeter` (saved tensors by unique storage, parameters and
compute weights skipped), at 2 and at 4 layers: the difference / 2 is one layer, free of the
embedding and the logits. Columns are in units of sbh (global s, b, h); Megatron's terms, in
16-bit: 34/t (everything but the scores; t = tp_col under SP, 1 without), 5as/(ht) scores
(none: our fused attention keeps no s^2 scores; selective recomputation drops them in
Megatron too), full recomputation 2/t. `perfmodel` is `layer_activation_terms` with its
statistics (norm rstd, log-sum-exp), which the meter counts too.

Table 2 runs one trainer step: params / grads / optimizer are `axon.memory.model_state_bytes` of
the engine's state tensors (the bf16 compute weights are in params); activations the pipeline
store's peak as plan.json records it (each saved storage once); host the offloaded optimizer states
plus the store's peak of offloaded activations. Buffers (ZeRO-3 and tp_depth gathered weights)
are transient and not reported by the runtime: n/m. Predicted: the performance model's `Memory`
for the same model, plan and dtype (no overhead).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

RECOMPUTE = ("none", "selective", "full")
TP_SP = (1, 2, 4)  # tp_col; sequence parallelism on when > 1
LAYOUTS = {  # name: overrides (8 ranks each)
    "dp=8": ["parallel.dp=8"],
    "zero1 dp=8": ["parallel.dp=8", "parallel.zero=1"],
    "zero2 dp=8": ["parallel.dp=8", "parallel.zero=2"],
    "zero3 dp=8": ["parallel.dp=8", "parallel.zero=3"],
    "3D tp 2x2x2 + SP": ["parallel.tp_col=2", "parallel.tp_row=2", "parallel.tp_depth=2",
                         "parallel.sequence_parallel=true"],
    "tp_col=4 SP dp=2": ["parallel.tp_col=4", "parallel.dp=2", "parallel.sequence_parallel=true"],
    "pp=4 dp=2 1f1b": ["parallel.pp=4", "parallel.dp=2", "parallel.schedule=1f1b"],
    "pp=4 dp=2 interleaved v=2": ["parallel.pp=4", "parallel.dp=2", "parallel.schedule=interleaved",
                                  "parallel.virtual_stages=2"],
    "pp=4 dp=2 zbv": ["parallel.pp=4", "parallel.dp=2", "parallel.schedule=zbv", "parallel.virtual_stages=2"],
    "pp=4 dp=2 1f1b + offload": ["parallel.pp=4", "parallel.dp=2", "parallel.schedule=1f1b",
                                 "parallel.offload.optimizer=true", "parallel.offload.activations=0.5"],
    "cp=4 dp=2 ring": ["parallel.cp=4", "parallel.dp=2", "parallel.cp_mode=ring"],
    "cp=4 dp=2 ulysses": ["parallel.cp=4", "parallel.dp=2", "parallel.cp_mode=ulysses"],
}
ROLES = ("params", "grads", "optimizer", "activations", "buffers", "host")
UNMEASURED = ("buffers",)  # transient gathered weights: the runtime reports no byte count for them
COLUMNS = ROLES


def _fake_world(world: int) -> None:
    """Rank 0 of `world` over torch's fake process group (registered by its testing module)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)


def _trainer(world: int, overrides: list[str], run_dir: Path):
    from axon import trainer
    from axon.config import freeze, load
    from launch.grid import Grid

    cfg = freeze(load(["model=tiny", "train.progress=false", "logger.wandb.mode=disabled", f"run.dir={run_dir}",
                       "checkpoint.at_end=false", "optim.grad_clip=0", "train.on_nonfinite=skip", *overrides]))
    return cfg, trainer.Trainer(cfg, Grid.build(cfg.plan, 0, world), torch.device("cpu"))


def chunk_saved_bytes(t, batch: int, seq: int, vocab: int) -> int:
    """Bytes (unique storages) the rank's only chunk holds for backward after one forward."""
    from axon.memory import ActivationMeter

    chunk = t.pipe.chunks[0]
    tokens = torch.randint(vocab, (batch, seq), generator=torch.Generator().manual_seed(0))  # [B, S]
    with t.precision.step():
        with ActivationMeter() as meter:
            with t.precision.forward():
                out = chunk(tokens)  # [B, S/tp_col under SP, V/tp_col]
        held = meter.live
        out.float().sum().backward()
    return held


def layer_bytes(model: list[str], tp: int, recompute: str, dtype: str, dims: dict[str, int]) -> float:
    """One layer's saved bytes on rank 0 of tp_col = tp (+ SP): chunk at 4 layers minus at 2, / 2."""
    held = {}
    for layers in (2, 4):
        over = [*model, f"model.n_layers={layers}", f"parallel.tp_col={tp}", f"parallel.recompute={recompute}",
                f"parallel.sequence_parallel={'true' if tp > 1 else 'false'}", f"train.dtype={dtype}",
                f"train.global_batch_size={dims['batch']}"]
        _fake_world(tp)
        try:
            with tempfile.TemporaryDirectory() as tmp:
                cfg, t = _trainer(tp, over, Path(tmp))
                held[layers] = chunk_saved_bytes(t, dims["batch"], dims["seq"], cfg.model.vocab_size)
                t.engine.remove()
        finally:
            dist.destroy_process_group()
    return (held[4] - held[2]) / 2


def megatron_sbh(tp: int, recompute: str, a: int, s: int, h: int) -> tuple[float, float]:
    """(34 sbh term, 5as^2b term) per layer in units of sbh, 16-bit, TP t with SP."""
    if recompute == "full":
        return 2 / tp, 0.0
    return 34 / tp, (0.0 if recompute == "selective" else 5 * a * s / (h * tp))


def activation_table(dims: dict[str, int], model: list[str]) -> list[dict]:
    from perfmodel.memory import layer_activation_terms
    from axon.config import freeze, load

    spec = freeze(load(["model=tiny", *model, "model.n_layers=2"])).model
    sbh = dims["seq"] * dims["batch"] * spec.d_model
    rows = []
    for tp in TP_SP:
        for recompute in RECOMPUTE:
            measured = layer_bytes(model, tp, recompute, "bf16", dims)
            terms = layer_activation_terms(spec, dims["seq"], dims["batch"], tp_col=tp, sequence_parallel=tp > 1,
                                           recompute=recompute, dtype_bytes=2)
            dense, scores = megatron_sbh(tp, recompute, spec.n_heads, dims["seq"], spec.d_model)
            rows.append({"tp_col": tp, "recompute": recompute, "measured": measured / sbh,
                         "perfmodel": sum(terms.values()) / sbh,
                         "projection inputs": terms.get("projection inputs", 0.0) / sbh,
                         "megatron 34/t": dense, "megatron 5as/ht": scores})
    return rows


def measure_roles(overrides: list[str], run_dir: Path) -> tuple[dict[str, int], object]:
    """Measured bytes by role on rank 0 of 8 after one step, and the frozen config."""
    from axon import memory

    _fake_world(8)
    try:
        cfg, t = _trainer(8, overrides, run_dir)
        t.step(0)
        t.engine.create_states()  # creates Adam states a skipped step left uncreated (fake data can overflow)
        got = memory.model_state_bytes(t.engine.state_tensors())
        got["host"] = got.get("host", 0) + t.pipe.last_memory.peak_host_bytes  # + offloaded activations
        got["activations"] = t.pipe.last_memory.peak_device_bytes
        t.engine.remove()
        return got, cfg
    finally:
        dist.destroy_process_group()


def role_row(name: str, overrides: list[str], dtype: str, model: list[str], run_dir: Path) -> dict:
    """Measured and predicted bytes per role on rank 0 of the 8-rank layout `name`; activations
    as the trainer records them (the pipeline store: each saved storage once)."""
    from perfmodel.estimate import evaluate
    from perfmodel.specs import Cluster

    over = [*model, *overrides, f"train.dtype={dtype}"]
    got, cfg = measure_roles(over, run_dir)
    c = replace(Cluster(), dtype_bytes=2 if dtype == "bf16" else 4, overhead_bytes=0.0)
    est = evaluate(cfg.model, cfg.plan, c, cfg.train.global_batch_size, cfg.train.seq_len).memory
    want = {role: getattr(est, role) for role in ROLES}
    return {"layout": name, "dtype": dtype, "measured": {r: got.get(r, 0) for r in COLUMNS}, "predicted": want}


def role_table(model: list[str]) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, layout in LAYOUTS.items():
            for dtype in ("fp32", "bf16"):
                rows.append(role_row(name, layout, dtype, model, Path(tmp) / f"run{len(rows)}"))
                print(f"done {name} {dtype}", file=sys.stderr, flush=True)
    return rows


def _ratio(got: float, want: float) -> str:
    if want == 0:
        return "-" if got == 0 else "inf"
    return f"{got / want:.3f}"


def print_activations(rows: list[dict]) -> None:
    """Per-term ratios: our dense terms against 34/t (no scores here: fused attention), and the
    whole against 34/t + 5as/(ht); the projection inputs (under SP their sequence shard, re-gathered
    in backward as Megatron-SP does)."""
    print("| tp_col (SP) | recompute | measured sbh | perfmodel sbh | Megatron 34/t | Megatron 5as/(ht) "
          "| measured / (34/t) | measured / Megatron | projection inputs sbh |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        t, dense = r["tp_col"], r["megatron 34/t"]
        print(f"| {t}{' (SP)' if t > 1 else ''} | {r['recompute']} | {r['measured']:.4f} | {r['perfmodel']:.4f} | "
              f"{dense:.3f} | {r['megatron 5as/ht']:.3f} | {r['measured'] / dense:.3f} | "
              f"{r['measured'] / (dense + r['megatron 5as/ht']):.3f} | {r['projection inputs']:.3f} |")


def print_roles(rows: list[dict]) -> None:
    print("| layout | dtype | " + " | ".join(f"{r} MiB meas / pred (ratio)" for r in COLUMNS) + " |")
    print("|---|---|" + "---|" * len(COLUMNS))
    for row in rows:
        m, p = row["measured"], row["predicted"]
        cells = [f"{'n/m' if r in UNMEASURED else f'{m[r] / 2**20:.2f}'} / {p[r] / 2**20:.2f}"
                 f" ({'-' if r in UNMEASURED else _ratio(m[r], p[r])})" for r in COLUMNS]
        print(f"| {row['layout']} | {row['dtype']} | " + " | ".join(cells) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=8, help="table 2 only (table 1 runs 2 and 4)")
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--only", choices=("activations", "roles"), default=None)
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    a = ap.parse_args()
    dims = {"seq": a.seq, "batch": 2}
    model = [f"model.d_model={a.width}", "model.n_heads=8", "model.n_kv_heads=4",
             f"model.d_ff={a.width * 8 // 3 // 8 * 8}", f"train.seq_len={a.seq}", "parallel.micro_batch_size=2"]
    out = {}
    if a.only != "roles":
        out["activations"] = activation_table(dims, model)
        print(f"Table 1: one layer, bf16, width {a.width}, 8 heads (4 KV), seq {a.seq}, micro-batch 2; units of sbh")
        print_activations(out["activations"])
    if a.only != "activations":
        out["roles"] = role_table([*model, f"model.n_layers={a.layers}", "train.global_batch_size=32"])
        print(f"\nTable 2: rank 0 of 8, {a.layers} layers, width {a.width}, seq {a.seq}, micro-batch 2, "
              "global batch 32")
        print_roles(out["roles"])
    if a.json is not None:
        a.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
