"""Predictions of the performance model beside published throughput numbers.

Usage: .venv/bin/python benchmarks/perfmodel_anchors.py [--large] [--calibrate] [--steps]

Each anchor states the published number with its source, the layout the authors used (as far as
published; batch sizes marked "assumed" were not), the software stack it ran on (`Cluster.stack`,
and Float8 Linears or AsyncTP where the run used them), the model's prediction for that layout,
the model's own best plan, and its role: which preset number it calibrates (`CALIBRATES`), a
held-out check, or not comparable (and why). A speedup anchor (unit "x <technique>") is a pair of
published runs that differ only in that technique: its value is the one over the other, predicted
the same way. `--calibrate` fits each calibrated number: the value at which the geometric mean of
its anchors' predicted / published is 1 (configs/cluster/*.yaml carry the rounded values beside
their evidence).
Sources: the Llama 3 paper (arXiv 2407.21783) Table 4; Smith et al. 2022 (arXiv 2201.11990);
Narayanan et al. 2021 (arXiv 2104.04473) Table 1; Korthikanti et al. 2022 (arXiv 2205.05198)
abstract; the AxoNN 4D paper (arXiv 2305.13525) abstract; the Megatron-LM README; torchtitan
benchmarks/llama3_h100_202412_torchtitan.md (December 2024) and asyncTP_llama3_h100_2025-06_torchtitan.md
(June 2025).
"""
from __future__ import annotations

import argparse
import math
from dataclasses import replace

from axon.config import freeze, load
from perfmodel.estimate import estimate
from perfmodel.search import search
from perfmodel.specs import ModelSpec, Plan

GPT80B = ModelSpec(n_layers=44, d_model=12288, n_heads=96, n_kv_heads=96, d_ff=4 * 12288, vocab_size=51200,
                   max_seq_len=2048, norm="layernorm", pos="learned", mlp="gelu", bias=True)  # 12Lh^2 = 80B (assumed shape)
MTNLG530B = ModelSpec(n_layers=105, d_model=20480, n_heads=128, n_kv_heads=128, d_ff=4 * 20480, vocab_size=51200,
                      max_seq_len=2048, norm="layernorm", pos="learned", mlp="gelu", bias=True)  # Smith et al. 2022
GPT1T = ModelSpec(n_layers=128, d_model=25600, n_heads=160, n_kv_heads=160, d_ff=4 * 25600, vocab_size=51200,
                  max_seq_len=2048, norm="layernorm", pos="learned", mlp="gelu", bias=True)  # Narayanan et al. 2021
GPT175B = ModelSpec(n_layers=96, d_model=12288, n_heads=96, n_kv_heads=96, d_ff=4 * 12288, vocab_size=51200,
                    max_seq_len=2048, norm="layernorm", pos="learned", mlp="gelu", bias=True)


def preset(model: str, cluster: str, nodes: int, **cluster_changes):
    cfg = freeze(load([f"model={model}", f"cluster={cluster}", f"cluster.nodes={nodes}"]))
    return cfg.model, replace(cfg.cluster, **cluster_changes)


def megatron_tokens_per_s(tflops: float, m: ModelSpec, seq: int) -> float:
    """Tokens/s per GPU behind a Megatron-LM TFLOP/s figure: their count, 96 B s l h^2 (1 + s/6h +
    V/16lh) per batch of B sequences, includes the full recomputation's extra forward (Narayanan
    et al. 2021, eq. 3)."""
    l, h = m.n_layers, m.d_model
    return tflops * 1e12 / (96 * l * h * h * (1 + seq / (6 * h) + m.vocab_size / (16 * l * h)))


MTNLG = "MT-NLG 530B, 2,240 A100, TP8 PP35 DP8"
KORTHIKANTI = "Megatron-LM GPT 530B, 2,240 A100, TP8 PP35 DP8, full recompute"
# The anchors each preset number is fitted on (`--calibrate`); every other comparable anchor is a held-out check
TT8_EAGER, TT8_COMPILE, TT70_BF16 = ("torchtitan Llama 3.1 8B, 8 H100 FSDP", "torchtitan Llama 3.1 8B, 8 H100 FSDP compile",
                                     "torchtitan Llama 3.1 70B, 256 H100 FSDP32 TP8 compile (2025)")
TT8_FLOAT8 = "torchtitan Llama 3.1 8B, 8 H100 FSDP compile: Float8 over bf16"
CALIBRATES = {
    "Llama 3 405B, 8,192 H100, TP8 PP16 DP64": ("dgx-h100", "compute_efficiency"),
    TT8_EAGER: ("dgx-h100", "eager_efficiency"),
    TT8_COMPILE: ("dgx-h100", "compiled_efficiency"),
    TT70_BF16: ("dgx-h100", "compiled_efficiency"),
    TT8_FLOAT8: ("dgx-h100", "float8_speedup"),
    KORTHIKANTI: ("perlmutter", "compute_efficiency"),
}
# Anchors no per-stack compute efficiency can match, and why
NOT_COMPARABLE = {
    MTNLG: "the 2021 Megatron-DeepSpeed pipeline engine: Megatron-LM ran the same model on the same 2,240 A100 "
           "with full recompute at 42.1% MFU (Korthikanti et al.), 1.39x MT-NLG's 30.3%; the gap is the engine, "
           "not the kernels the stack efficiency prices",
}
# A speedup anchor's unit: "x " + the Cluster switch its pair differs in (the value is on over off)
SPEEDUP = "x "


def role(name: str, layout) -> str:
    if name in CALIBRATES:
        return "calibrates {} {}".format(*CALIBRATES[name])
    if name in NOT_COMPARABLE:
        return "not comparable: " + NOT_COMPARABLE[name]
    return "held out" if layout is not None else "no published layout"


def large_runs():
    """Published large runs with their layouts (issue 19's validation table): (name, published
    value, unit, model, cluster, world, gbs, seq, layout, note)."""
    _, meta8k = preset("tiny", "dgx-h100", 1024)
    _, meta16k = preset("tiny", "dgx-h100", 2048)
    l405, _ = preset("llama3.1-405b", "dgx-h100", 1)
    # Selene / the MT-NLG cluster: DGX A100 80 GB, 8 GPUs per node on NVSwitch (600 GB/s NVLink), one
    # 200 Gb/s HDR InfiniBand NIC per GPU; the Perlmutter preset's A100 figures otherwise
    _, dgxa100 = preset("tiny", "perlmutter", 280, gpus_per_node=8, hbm_bytes=85.9e9, intra_bw=230e9, inter_bw=22e9,
                        mem_bw=2.039e12, host_bytes=1e12)
    sel384 = replace(dgxa100, nodes=384)
    llama3 = dict(tp_col=8, pp=16, sequence_parallel=True, micro_batch_size=1, schedule="interleaved",
                  virtual_stages=8)  # one layer per chunk (the paper names the interleaved schedule, not v)
    l405_128 = replace(l405, n_layers=128)  # Meta balanced 126 layers over 16 stages unevenly; we need 16 | 128 chunks
    return [
        ("Llama 3 405B, 8,192 H100, TP8 PP16 DP64", 0.43, "MFU", l405_128, meta8k, 8192, 2048, 8192,
         Plan(dp=64, zero=1, **llama3), "Llama 3 paper (arXiv 2407.21783) Table 4: 430 TFLOP/s/GPU, 43% BF16 MFU; "
                                        "batch 32/DP x 64 = 2048 x 8192; ZeRO-1, v=8 assumed (v=2: 0.87, v=4: 0.95)"),
        ("Llama 3 405B, 16,384 H100, TP8 PP16 DP128", 0.41, "MFU", l405_128, meta16k, 16384, 2048, 8192,
         Plan(dp=128, zero=1, **llama3), "same table: 400 TFLOP/s/GPU, 41%; batch 16/DP x 128 = 2048 (v=2: 0.75, v=4: 0.88)"),
        (MTNLG, megatron_tokens_per_s(126, MTNLG530B, 2048), "tok/s/GPU",
         MTNLG530B, dgxa100, 2240, 1920, 2048,
         Plan(dp=8, tp_col=8, pp=35, zero=1, micro_batch_size=1, recompute="full"),
         "Smith et al. 2022 (arXiv 2201.11990): 126 TFLOP/s/GPU (Megatron count, full recompute), batch 1920 x 2048"),
        (KORTHIKANTI, 0.421, "MFU", MTNLG530B, dgxa100, 2240, 2240, 2048,
         Plan(dp=8, tp_col=8, pp=35, zero=1, micro_batch_size=1, recompute="full"),
         "Korthikanti et al. 2022 (arXiv 2205.05198) abstract: 42.1% MFU with recomputation on 2,240 A100; "
         "TP8 PP35 and batch 2240 from their Table 3 (assumed: not in the abstract)"),
        ("Megatron-LM GPT 530B, 2,240 A100, TP8 PP35 DP8, SP + selective", 0.542, "MFU", MTNLG530B, dgxa100, 2240,
         2240, 2048, Plan(dp=8, tp_col=8, pp=35, zero=1, micro_batch_size=1, recompute="selective",
                          sequence_parallel=True),
         "same abstract: 54.2% MFU with sequence parallelism and selective recomputation"),
        ("Megatron GPT 1T, 3,072 A100, TP8 PP64 DP6", megatron_tokens_per_s(163, GPT1T, 2048), "tok/s/GPU",
         GPT1T, sel384, 3072, 3072, 2048,
         Plan(dp=6, tp_col=8, pp=64, micro_batch_size=1, recompute="full", schedule="interleaved", virtual_stages=2),
         "Narayanan et al. 2021 (arXiv 2104.04473) Table 1: 163 TFLOP/s/GPU (52% of peak, Megatron count), "
         "batch 3072 x 2048; interleaved v=2 assumed"),
    ]


def anchors():
    """(name, published value, unit, model, cluster, world, gbs, seq, published layout or None, note)."""
    _, perl = preset("tiny", "perlmutter", 256)
    _, dgx96 = preset("tiny", "dgx-h100", 12)
    _, dgx4608 = preset("tiny", "dgx-h100", 576)
    return [
        ("AxoNN GPT-80B, 1024 Perlmutter A100", 0.57, "MFU", GPT80B, perl, 1024, 8192, 2048, None,
         "arXiv 2305.13525 abstract: 182 PFLOP/s = 57% of peak; batch assumed 8192 x 2048"),
        ("Megatron GPT-175B, 96 H100", 0.47, "MFU", GPT175B, dgx96, 96, 1536, 2048, None,
         "Megatron-LM README strong scaling (47% -> 42%); batch 1536 assumed"),
        ("Megatron GPT-175B, 4608 H100", 0.42, "MFU", GPT175B, dgx4608, 4608, 1536, 2048, None,
         "same strong-scaling series"),
    ] + torchtitan_runs()


def torchtitan_runs():
    """torchtitan's published Llama 3.1 runs on Grand Teton (H100 96 GB HBM2e capped at 500 W, 400 Gb/s
    per GPU; tok/s/GPU read at iteration 90), with their layouts. What they ran, read from torchtitan's
    source of the benchmark's date: FSDP2 (zero=3); selective AC = per-op SAC, which recomputes every
    second matmul (wk, wo, w3: 36.5% of a Llama Block's forward GEMM FLOPs), priced as full recomputation
    of 12 of the 32 Blocks (37.5%); no gradient accumulation (a local batch is one microbatch), except
    under pipelining, which splits it into as many microbatches as stages; FSDP under pipelining keeps
    the parameters gathered over the step and reduce-scatters gradients at the last microbatch
    (reshard_after_forward=False): the bytes of ZeRO-1 (one all-gather, one reduce-scatter per step),
    priced as zero=1; Float8 = torchao Float8Linear with dynamic tensorwise scaling on every Linear but
    the output head; TP with sequence parallelism."""
    def tt(model: str, nodes: int, **changes):
        return preset(model, "dgx-h100", nodes, hbm_bytes=96e9, **changes)

    sac = dict(recompute="full", recompute_layers=12)
    l8, eager8 = tt("llama3-8b", 1, stack="eager")
    _, comp8 = tt("llama3-8b", 1, stack="compiled")
    _, eager128 = tt("llama3-8b", 16, stack="eager")
    _, comp128 = tt("llama3-8b", 16, stack="compiled")
    _, comp64 = tt("llama3-8b", 8, stack="compiled")
    l70, comp256 = tt("llama3.1-70b", 32, stack="compiled")
    l405, comp512 = tt("llama3.1-405b", 64, stack="compiled")
    l405_128 = replace(l405, n_layers=128)  # torchtitan splits 126 layers unevenly over pp=8; we need 8 | layers
    f8, atp = dict(float8_linears=True), dict(async_tp=True)
    fsdp8, fsdp128 = Plan(dp=8, micro_batch_size=2, zero=3, **sac), Plan(dp=128, micro_batch_size=2, zero=3, **sac)
    tp8_8b = Plan(dp=8, tp_col=8, sequence_parallel=True, micro_batch_size=12, zero=3, **sac)
    tp8_70b = Plan(dp=32, tp_col=8, sequence_parallel=True, micro_batch_size=16, recompute="full", zero=3)
    pp_405b = Plan(dp=8, tp_col=8, pp=8, sequence_parallel=True, micro_batch_size=4, recompute="full",
                   schedule="1f1b", zero=1)
    dec, jun = "llama3_h100_202412_torchtitan.md", "asyncTP_llama3_h100_2025-06_torchtitan.md"
    t1 = f"{dec} Table 1: local batch 2, gbs 16, selective (op) AC"
    t3 = f"{dec} Table 3: 128 GPUs, local batch 2, gbs 256, selective (op) AC"
    t4 = f"{dec} Table 4: FSDP32 TP8, compile + Float8, local batch 16, gbs 512, full AC"
    t5 = (f"{dec} Table 5: FSDP8 TP8 PP8, compile + Float8 + AsyncTP, local batch 32 in 8 microbatches of 4, "
          "gbs 256, full AC; 128 layers modelled (126 in reality)")
    j70 = f"{jun}: 70B, FSDP32 TP8, compile, full AC, local batch 16"
    j8 = f"{jun}: 8B, FSDP8 TP8, compile, per-op SAC, local batch 12"
    return [
        (TT8_EAGER, 5762, "tok/s/GPU", l8, eager8, 8, 16, 8192, fsdp8, t1 + ", eager bf16"),
        (TT8_COMPILE, 6667, "tok/s/GPU", l8, comp8, 8, 16, 8192, fsdp8, t1 + ", compile bf16"),
        ("torchtitan Llama 3.1 8B, 8 H100 FSDP compile + Float8", 8532, "tok/s/GPU", l8, replace(comp8, **f8), 8, 16,
         8192, fsdp8, t1 + ", compile + Float8"),
        (TT8_FLOAT8, 8532 / 6667, SPEEDUP + "float8_linears", l8, replace(comp8, **f8), 8, 16, 8192, fsdp8,
         t1 + ": 8,532 / 6,667"),
        ("torchtitan Llama 3.1 8B, 128 H100 FSDP", 5605, "tok/s/GPU", l8, eager128, 128, 256, 8192, fsdp128,
         t3 + ", eager bf16"),
        ("torchtitan Llama 3.1 8B, 128 H100 FSDP compile", 6514, "tok/s/GPU", l8, comp128, 128, 256, 8192, fsdp128,
         t3 + ", compile bf16"),
        ("torchtitan Llama 3.1 8B, 128 H100 FSDP compile + Float8", 8380, "tok/s/GPU", l8, replace(comp128, **f8),
         128, 256, 8192, fsdp128, t3 + ", compile + Float8"),
        ("torchtitan Llama 3.1 70B, 256 H100 FSDP32 TP8 compile + Float8", 829, "tok/s/GPU", l70,
         replace(comp256, **f8), 256, 512, 8192, tp8_70b, t4),
        ("torchtitan Llama 3.1 70B, 256 H100 FSDP32 TP8 compile + Float8 + AsyncTP", 876, "tok/s/GPU", l70,
         replace(comp256, **f8, **atp), 256, 512, 8192, tp8_70b, t4 + ", AsyncTP"),
        ("torchtitan Llama 3.1 405B, 512 H100 3D 1F1B compile + Float8 + AsyncTP", 100, "tok/s/GPU", l405_128,
         replace(comp512, **f8, **atp), 512, 256, 8192, pp_405b, t5),
        ("torchtitan Llama 3.1 405B, 512 H100 3D interleaved compile + Float8 + AsyncTP", 128, "tok/s/GPU",
         l405_128, replace(comp512, **f8, **atp), 512, 256, 8192,
         pp_405b.replace(schedule="interleaved", virtual_stages=2),
         "as above, interleaved 1F1B; v=2 assumed (their 1.28x over 1F1B is v=2's bubble at 8 microbatches)"),
        (TT70_BF16, 597.3, "tok/s/GPU", l70, comp256, 256, 512, 8192, tp8_70b, j70 + ", bf16"),
        ("torchtitan Llama 3.1 70B, 256 H100 FSDP32 TP8 compile + AsyncTP (2025)", 652.4, "tok/s/GPU", l70,
         replace(comp256, **atp), 256, 512, 8192, tp8_70b, j70 + ", bf16 + AsyncTP"),
        ("torchtitan Llama 3.1 70B, 256 H100 FSDP32 TP8 compile + Float8 (2025)", 809.8, "tok/s/GPU", l70,
         replace(comp256, **f8), 256, 512, 8192, tp8_70b, j70 + ", Float8 tensorwise"),
        ("torchtitan Llama 3.1 70B, 256 H100 FSDP32 TP8 compile + Float8 + AsyncTP (2025)", 942.4, "tok/s/GPU", l70,
         replace(comp256, **f8, **atp), 256, 512, 8192, tp8_70b, j70 + ", Float8 tensorwise + AsyncTP"),
        ("torchtitan Llama 3.1 70B, FSDP32 TP8 compile (2025): Float8 over bf16", 809.8 / 597.3,
         SPEEDUP + "float8_linears", l70, replace(comp256, **f8), 256, 512, 8192, tp8_70b, j70 + ": 809.8 / 597.3"),
        ("torchtitan Llama 3.1 70B, FSDP32 TP8 compile (2025): AsyncTP over TP", 652.4 / 597.3, SPEEDUP + "async_tp",
         l70, replace(comp256, **atp), 256, 512, 8192, tp8_70b, j70 + ", bf16: 652.4 / 597.3"),
        ("torchtitan Llama 3.1 8B, 64 H100 FSDP8 TP8 compile (2025)", 4378, "tok/s/GPU", l8, comp64, 64, 96, 8192,
         tp8_8b, j8 + ", bf16"),
        ("torchtitan Llama 3.1 8B, 64 H100 FSDP8 TP8 compile + Float8 (2025)", 5078.1, "tok/s/GPU", l8,
         replace(comp64, **f8), 64, 96, 8192, tp8_8b, j8 + ", Float8 tensorwise"),
    ]


def stack(c) -> str:
    """The software stack an anchor ran on, with the priced techniques it used."""
    return c.stack + (" + Float8" if c.float8_linears else "") + (" + AsyncTP" if c.async_tp else "")


def value(e, unit: str) -> float:
    return e.mfu if unit == "MFU" else e.tokens_per_s / e.plan.world_size


def predict(unit: str, model, layout, cluster, gbs: int, seq: int) -> tuple[float, bool]:
    """(the model's value of an anchor at its layout, whether that layout fits); a speedup anchor's
    is the run's tokens/s over the same run with its technique off."""
    e = estimate(model, layout, cluster, gbs, seq)
    if unit.startswith(SPEEDUP):
        off = estimate(model, layout, replace(cluster, **{unit[len(SPEEDUP):]: False}), gbs, seq)
        return e.tokens_per_s / off.tokens_per_s, e.fits
    return value(e, unit), e.fits


def fmt(x: float, unit: str) -> str:
    return f"{x:.1%}" if unit == "MFU" else f"{x:.3f}x" if unit.startswith(SPEEDUP) else f"{x:,.0f}"


def ratio(pub: float, unit: str, model, cluster, gbs: int, seq: int, layout, **changes) -> float:
    """Predicted / published of an anchor at its published layout, with `changes` to its cluster."""
    return predict(unit, model, layout, replace(cluster, **changes), gbs, seq)[0] / pub


def calibrate(rows) -> None:
    """Print each calibrated number: the value at which its anchors' predicted / published have
    geometric mean 1 (bisection; the prediction rises with the efficiency)."""
    groups: dict[tuple[str, str], list] = {}
    for row in rows:
        if row[0] in CALIBRATES:
            groups.setdefault(CALIBRATES[row[0]], []).append(row)
    print("| preset | number | fitted value | on anchors |")
    print("|---|---|---|---|")
    for (preset_name, number), members in groups.items():
        low, high = (1.0, 3.0) if number == "float8_speedup" else (0.05, 1.0)
        for _ in range(30):
            mid = (low + high) / 2
            logs = [math.log(ratio(pub, u, mdl, cl, gbs, seq, lay, **{number: mid}))
                    for _, pub, u, mdl, cl, _, gbs, seq, lay, _ in members]
            low, high = (mid, high) if sum(logs) < 0 else (low, mid)
        print(f"| {preset_name} | {number} | {(low + high) / 2:.3f} | {'; '.join(r[0] for r in members)} |", flush=True)


# What the model knew before pricing torchtitan's techniques, then one added at a time (`--steps`)
STEPS = [("their layouts as they ran; fused 0.55, attention at the GEMM rate, bf16",
          dict(stack="fused", compute_efficiency=0.55, attention_efficiency=1.0, float8_linears=False, async_tp=False)),
         ("+ attention core at 0.5 x the GEMM rate, fused refit 0.57",
          dict(stack="fused", compute_efficiency=0.57, float8_linears=False, async_tp=False)),
         ("+ the compiled stack's efficiency", dict(float8_linears=False, async_tp=False)),
         ("+ Float8 Linears", dict(async_tp=False)),
         ("+ AsyncTP (where the run used it)", {})]


def steps() -> None:
    """Predicted / published of torchtitan's Float8 runs as each priced technique is added."""
    runs = [r for r in torchtitan_runs() if r[3].n_layers > 32 and r[4].float8_linears and not r[2].startswith(SPEEDUP)]
    print("| step | " + " | ".join(r[0].replace("torchtitan Llama 3.1 ", "") for r in runs) + " |")
    print("|---|" + "---|" * len(runs))
    for label, changes in STEPS:
        cells = [f"{ratio(pub, u, mdl, cl, gbs, seq, lay, **changes):.2f}" if cl.async_tp or "async_tp" in changes
                 else "-" for _, pub, u, mdl, cl, _, gbs, seq, lay, _ in runs]  # the AsyncTP step: its runs only
        print(f"| {label} | " + " | ".join(cells) + " |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--large", action="store_true", help="only the published large runs (issue 19's table), with "
                                                         "predicted / published")
    p.add_argument("--calibrate", action="store_true", help="fit the calibrated preset numbers on their anchors")
    p.add_argument("--steps", action="store_true", help="torchtitan's Float8 runs as each priced technique is added")
    args = p.parse_args()
    if args.steps:
        steps()
        return
    rows = large_runs() + ([] if args.large and not args.calibrate else anchors())
    if args.calibrate:
        calibrate(rows)
        return
    print("| anchor | published | stack | predicted (their layout) | predicted / published | predicted (our best plan) "
          "| our best plan | role | note |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, pub, unit, model, cluster, world, gbs, seq, layout, note in rows:
        theirs = ratio_s = "-"
        if layout is not None:
            predicted, fits = predict(unit, model, layout, cluster, gbs, seq)
            theirs = fmt(predicted, unit) + ("" if fits else " (does not fit)")
            ratio_s = f"{predicted / pub:.2f}"
        best = [] if unit.startswith(SPEEDUP) else search(model, cluster, world, {}, gbs, seq, top=1).estimates
        ours, plan = ("-" if unit.startswith(SPEEDUP) else "no fit", "-")
        if best:
            b = best[0]
            p = b.plan
            ours = fmt(value(b, unit), unit)
            plan = (f"dp={p.dp} pp={p.pp} cp={p.cp} tp={p.tp_col}x{p.tp_row}x{p.tp_depth} zero={p.zero} "
                    f"{p.schedule}/v{p.virtual_stages} mbs={p.micro_batch_size} rc={p.recompute}")
        print(f"| {name} | {fmt(pub, unit)} | {stack(cluster)} | {theirs} | {ratio_s} | {ours} | {plan} | "
              f"{role(name, layout)} | {note} |", flush=True)


if __name__ == "__main__":
    main()
