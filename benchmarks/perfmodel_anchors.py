"""Predictions of the performance model beside published throughput numbers.

Usage: .venv/bin/python benchmarks/perfmodel_anchors.py

Each anchor states the published number with its source, the layout the authors used (as far as
published; batch sizes marked "assumed" were not), the model's prediction for that layout and
the model's own best plan. Sources are the notes in /work/shared/reference/ (axonn.md section 6,
peers.md section 3), which cite: AxoNN 4D paper (arXiv 2305.13525) abstract; Megatron-LM README;
torchtitan benchmarks/llama3_h100_202412_torchtitan.md.
"""
from __future__ import annotations

from dataclasses import replace

from axon.config import freeze, load
from perfmodel.estimate import estimate
from perfmodel.search import search
from perfmodel.specs import ModelSpec, Plan

GPT80B = ModelSpec(n_layers=44, d_model=12288, n_heads=96, n_kv_heads=96, d_ff=4 * 12288, vocab_size=51200,
                   max_seq_len=2048, norm="layernorm", pos="learned", mlp="gelu", bias=True)  # 12Lh^2 = 80B (assumed shape)
GPT175B = ModelSpec(n_layers=96, d_model=12288, n_heads=96, n_kv_heads=96, d_ff=4 * 12288, vocab_size=51200,
                    max_seq_len=2048, norm="layernorm", pos="learned", mlp="gelu", bias=True)


def preset(model: str, cluster: str, nodes: int, **cluster_changes):
    cfg = freeze(load([f"model={model}", f"cluster={cluster}", f"cluster.nodes={nodes}"]))
    return cfg.model, replace(cfg.cluster, **cluster_changes)


def anchors():
    """(name, published value, unit, model, cluster, world, gbs, seq, published layout or None, note)."""
    _, perl = preset("tiny", "perlmutter", 256)
    _, dgx96 = preset("tiny", "dgx-h100", 12)
    _, dgx4608 = preset("tiny", "dgx-h100", 576)
    l8, tt8 = preset("llama3-8b", "dgx-h100", 1, hbm_bytes=96e9)  # torchtitan: H100 96 GB HBM2e, 500 W cap
    l70, tt256 = preset("llama3.1-70b", "dgx-h100", 32, hbm_bytes=96e9)
    l405, tt512 = preset("llama3.1-405b", "dgx-h100", 64, hbm_bytes=96e9)
    l405_128 = replace(l405, n_layers=128)  # torchtitan splits 126 layers unevenly over pp=8; we need 8 | layers
    fsdp = dict(zero=3)
    return [
        ("AxoNN GPT-80B, 1024 Perlmutter A100", 0.57, "MFU", GPT80B, perl, 1024, 8192, 2048, None,
         "arXiv 2305.13525 abstract: 182 PFLOP/s = 57% of peak; batch assumed 8192 x 2048"),
        ("Megatron GPT-175B, 96 H100", 0.47, "MFU", GPT175B, dgx96, 96, 1536, 2048, None,
         "Megatron-LM README strong scaling (47% -> 42%); batch 1536 assumed"),
        ("Megatron GPT-175B, 4608 H100", 0.42, "MFU", GPT175B, dgx4608, 4608, 1536, 2048, None,
         "same strong-scaling series"),
        ("torchtitan Llama 3.1 8B, 8 H100 FSDP", 5762, "tok/s/GPU", l8, tt8, 8, 8, 8192,
         Plan(dp=8, micro_batch_size=1, recompute="selective", **fsdp), "bf16, no compile; local batch 1 (llama3_8b.toml) assumed"),
        ("torchtitan Llama 3.1 70B, 256 H100 FSDP32 TP8", 829, "tok/s/GPU", l70, tt256, 256, 64, 8192,
         Plan(dp=32, tp_col=8, sequence_parallel=True, micro_batch_size=2, recompute="full", **fsdp),
         "local batch 16 per TP group assumed -> gbs 64 at 8192"),
        ("torchtitan Llama 3.1 405B, 512 H100 3D 1F1B", 100, "tok/s/GPU", l405_128, tt512, 512, 64, 8192,
         Plan(dp=8, tp_col=8, pp=8, sequence_parallel=True, micro_batch_size=1, recompute="full",
              schedule="1f1b", **fsdp), "FSDP8 TP8 PP8; 128 layers modelled (126 in reality); gbs assumed"),
        ("torchtitan Llama 3.1 405B, 512 H100 3D interleaved", 128, "tok/s/GPU", l405_128, tt512, 512, 64, 8192,
         Plan(dp=8, tp_col=8, pp=8, sequence_parallel=True, micro_batch_size=1, recompute="full",
              schedule="interleaved", virtual_stages=2, **fsdp), "as above, interleaved 1F1B (v=2 assumed)"),
    ]


def value(e, unit: str) -> float:
    return e.mfu if unit == "MFU" else e.tokens_per_s / e.plan.world_size


def fmt(x: float, unit: str) -> str:
    return f"{x:.1%}" if unit == "MFU" else f"{x:,.0f}"


def main() -> None:
    print("| anchor | published | predicted (their layout) | predicted (our best plan) | our best plan | note |")
    print("|---|---|---|---|---|---|")
    for name, pub, unit, model, cluster, world, gbs, seq, layout, note in anchors():
        theirs = "-"
        if layout is not None:
            e = estimate(model, layout, cluster, gbs, seq)
            theirs = fmt(value(e, unit), unit) + ("" if e.fits else " (does not fit)")
        best = search(model, cluster, world, {}, gbs, seq, top=1).estimates
        ours, plan = ("no fit", "-")
        if best:
            b = best[0]
            p = b.plan
            ours = fmt(value(b, unit), unit)
            plan = (f"dp={p.dp} pp={p.pp} cp={p.cp} tp={p.tp_col}x{p.tp_row}x{p.tp_depth} zero={p.zero} "
                    f"{p.schedule}/v{p.virtual_stages} mbs={p.micro_batch_size} rc={p.recompute}")
        print(f"| {name} | {fmt(pub, unit)} | {theirs} | {ours} | {plan} | {note} |")


if __name__ == "__main__":
    main()
