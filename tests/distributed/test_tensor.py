"""3D tensor parallelism: loss and every gradient equal a single-process run (fp32, relative
1e-5) for each (tp_col, tp_row, tp_depth) layout, with sequence parallelism, dp=2 and the overlap
switches on and off; the bytes counted per step equal the docs/architecture.md formulas; the
trainer's head loss (parallel/head_loss.py `choose`) on samples of two loss chunks: fused with the
vocabulary split under 1D layouts (with and without SP), the chunked loss of the logits under 3D
ones, equal to the single-process run either way; a layout that does not divide the model fails
before anything runs, naming the setting.
"""
from __future__ import annotations

import pytest

from parallel.tensor import check
from perfmodel.specs import ModelSpec, Plan, PlanError
from tests.distributed.tp_driver import MICRO, SEQ, parity

TOL = 1e-5
SMALL = dict(n_layers=2)
# LayerNorm with biases, learned positions and a GELU MLP: every other module path.
VARIANT = dict(n_layers=2, norm="layernorm", pos="learned", mlp="gelu", bias=True)
NO_OVERLAP = dict(overlap_tp_input_grad=False, overlap_tp_depth_reduce=False, prefetch_tp_weights=False)

# (world, plan fields, model fields, steps): steps=2 (an SGD update between) where cached or
# prefetched weights must be invalidated by the update.
CASES = [
    (2, dict(tp_col=2), SMALL, 1),
    (2, dict(tp_col=2, sequence_parallel=True), VARIANT, 1),
    (2, dict(tp_row=2), VARIANT, 1),
    (2, dict(tp_depth=2), SMALL, 2),
    (2, dict(tp_depth=2, **NO_OVERLAP), SMALL, 1),
    (2, dict(tp_depth=2, cache_tp_weights=True), SMALL, 2),
    (4, dict(tp_col=2, tp_row=2), SMALL, 1),
    (4, dict(tp_col=2, tp_row=2, sequence_parallel=True, **NO_OVERLAP), VARIANT, 1),
    (4, dict(tp_col=2, tp_depth=2, sequence_parallel=True), SMALL, 2),
    (4, dict(tp_col=2, dp=2, sequence_parallel=True), SMALL, 1),
    (4, dict(tp_row=2, dp=2), SMALL, 1),
    (4, dict(tp_depth=2, dp=2, cache_tp_weights=True), SMALL, 1),
    (8, dict(tp_col=2, tp_row=2, tp_depth=2), SMALL, 2),
    (8, dict(tp_col=2, tp_row=2, tp_depth=2, sequence_parallel=True, cache_tp_weights=True, **NO_OVERLAP), VARIANT, 2),
    (8, dict(tp_col=2, tp_row=2, dp=2, sequence_parallel=True), SMALL, 1),
    (8, dict(tp_col=2, tp_depth=2, dp=2), VARIANT, 1),
]


def expected_bytes(spec: ModelSpec, plan: Plan) -> dict[tuple[str, str], int]:
    """Bytes per rank per step (MICRO microbatches of one sample) from docs/architecture.md, Formulas."""
    X, Y, Z = plan.tp_col, plan.tp_row, plan.tp_depth
    size = {"tp_col": X, "tp_row": Y, "tp_depth": Z}
    sp = plan.sequence_parallel and X > 1
    m, d, F32 = SEQ, spec.d_model, 4  # tokens per rank per microbatch (depth splits samples)
    out: dict[tuple[str, str], int] = {}

    def add(axis: str, kind: str, elems: float, times: int = 1) -> None:
        if size[axis] > 1:
            out[(axis, kind)] = out.get((axis, kind), 0) + int(elems) * F32 * times

    def weight(k: int, n: int, gathers_per_micro: int) -> None:  # depth traffic of one k x n weight
        add("tp_depth", "all_gather", k * n / (X * Y), 1 if plan.cache_tp_weights else gathers_per_micro * MICRO)
        add("tp_depth", "reduce_scatter", k * n / (X * Y), MICRO)

    def linear(k: int, n: int, in_axis: str, out_axis: str, first: bool = True) -> None:
        weight(k, n, 2)
        if not (sp and in_axis == "tp_col"):
            add(in_axis, "all_reduce", m * n / size[out_axis], MICRO)  # output
        if first and not (sp and out_axis == "tp_col"):  # input gradient: once per group of one input
            add(out_axis, "all_reduce", m * k / size[in_axis], MICRO)

    def norm() -> None:
        add("tp_row", "all_reduce", (m / X if sp else m) * (2 if spec.norm == "rmsnorm" else 4), MICRO)
        if sp:  # the next group gathers the sequence (backward: again for its dW, then reduce-scatter)
            add("tp_col", "all_gather", m * d / Y, 2 * MICRO)
            add("tp_col", "reduce_scatter", m * d / Y, MICRO)

    kv, ff = spec.n_kv_heads * spec.head_dim, spec.d_ff
    weight(spec.vocab_size, d, 1)  # the embedding: gathered in forward only
    if sp:
        add("tp_col", "reduce_scatter", m * d / Y, MICRO)
        add("tp_col", "all_gather", m * d / Y, MICRO)
    else:
        add("tp_col", "all_reduce", m * d / Y, MICRO)
    for _ in range(spec.n_layers):
        norm()
        for i, n in enumerate((d, kv, kv)):
            linear(d, n, "tp_row", "tp_col", first=i == 0)
        linear(d, d, "tp_col", "tp_row")
        if sp:
            add("tp_col", "reduce_scatter", m * d / Y, MICRO)
            add("tp_col", "all_gather", m * d / Y, MICRO)
        norm()
        for i in range(2 if spec.mlp == "swiglu" else 1):
            linear(d, ff, "tp_row", "tp_col", first=i == 0)
        linear(ff, d, "tp_col", "tp_row")
        if sp:
            add("tp_col", "reduce_scatter", m * d / Y, MICRO)
            add("tp_col", "all_gather", m * d / Y, MICRO)
    norm()
    linear(d, spec.vocab_size, "tp_row", "tp_col")
    add("tp_col", "all_reduce", 3 * m, MICRO)  # vocab-parallel cross-entropy: max, then (sum exp, target)
    return out


def _id(case) -> str:
    world, plan, spec, steps = case
    layout = f"{plan.get('tp_col', 1)}{plan.get('tp_row', 1)}{plan.get('tp_depth', 1)}"
    flags = [k for k, v in plan.items() if v is True or k == "dp"] + (["variant"] if spec is VARIANT else [])
    flags += ["no_overlap"] if not plan.get("prefetch_tp_weights", True) else []
    return "-".join([f"w{world}", layout] + [f for f in flags if not f.startswith(("overlap", "prefetch"))])


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_parity_and_bytes(dist_pools, case):
    world, plan_kw, spec_kw, steps = case
    results = dist_pools.run(world, parity, [(plan_kw, spec_kw)], steps)
    spec, plan = ModelSpec(**spec_kw), Plan(**plan_kw)
    want = expected_bytes(spec, plan)
    piece = spec.vocab_size * spec.d_model // (plan.tp_col * plan.tp_row) * 4
    for rank, (res,) in enumerate(results):
        assert len(res["loss"]) == len(res["ref_loss"]) > 0
        for loss, ref in zip(res["loss"], res["ref_loss"]):
            assert abs(loss - ref) <= TOL * abs(ref), (rank, loss, ref)
        bad = {n: e for n, e in res["grad_err"].items() if e > TOL}
        assert not bad, f"rank {rank}: gradients differ from the single-process run: {bad}"
        for got in res["bytes"]:
            extra = dict(got)
            if plan.tp_depth > 1 and plan.prefetch_tp_weights and not plan.cache_tp_weights:
                # the end-of-step prefetch of the next step's first weight (the embedding)
                extra[("tp_depth", "all_gather")] -= piece
            assert extra == want, f"rank {rank}: bytes {got} != formula {want}"


# 512 tokens per microbatch over V/tp_col = 256 columns of a 64-wide head: chunks of 256 tokens
# (perfmodel/memory.py loss_chunk_tokens), so two chunks and the fused path where the head allows.
CHUNKED = dict(n_layers=1, d_model=64, n_heads=4, n_kv_heads=2, d_ff=128, vocab_size=512)
HEAD_CASES = [
    (dict(tp_col=2), CHUNKED, True),
    (dict(tp_col=2, sequence_parallel=True), dict(CHUNKED, norm="layernorm", pos="learned"), True),
    (dict(tp_row=2), CHUNKED, False),  # a 3D head (input split over tp_row): logits, then kernels' CE
]


@pytest.mark.parametrize("plan_kw, spec_kw, fused", HEAD_CASES, ids=["col", "col-sp", "row"])
def test_head_loss_fused_under_1d(dist_pools, plan_kw, spec_kw, fused):
    for rank, (res,) in enumerate(dist_pools.run(2, parity, [(plan_kw, spec_kw)], 1, chosen=True, seq=512)):
        assert res["fused_calls"] == ([512] * MICRO if fused else []), rank
        for loss, ref in zip(res["loss"], res["ref_loss"]):
            assert abs(loss - ref) <= TOL * abs(ref), (rank, loss, ref)
        bad = {n: e for n, e in res["grad_err"].items() if e > TOL}
        assert not bad, f"rank {rank}: gradients differ from the single-process run: {bad}"


@pytest.mark.parametrize("plan, spec, knob", [
    (Plan(tp_col=4), ModelSpec(n_kv_heads=2), "model.n_kv_heads"),
    (Plan(tp_col=3), ModelSpec(n_heads=6, n_kv_heads=6, d_model=132, d_ff=350, vocab_size=258), "model.d_ff"),
    (Plan(tp_col=2), ModelSpec(vocab_size=255), "model.vocab_size"),
    (Plan(tp_row=2, tp_depth=4), ModelSpec(d_model=132, n_heads=4), "parallel.tp_row * parallel.tp_depth"),
    (Plan(tp_col=2), ModelSpec(tied_embeddings=True), "model.tied_embeddings"),
])
def test_bad_layout_names_the_setting(plan, spec, knob):
    with pytest.raises(PlanError, match=knob.replace("*", r"\*")):
        check(spec, plan)
