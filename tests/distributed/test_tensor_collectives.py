"""Collectives of one transformer Block's backward under tensor parallelism, counted at the
torch.distributed calls: the input gradient is reduced once per group of projections that read
the same input (attention: wq, wk, wv; MLP: w_gate, w_up), 2 per Block as with Megatron's fused
QKV and fc1 (it was 5: one per projection), in 1D, with sequence parallelism (a reduce-scatter,
after the all-gather that brings back the group's sequence-sharded input for its weight gradients,
as Megatron-SP re-gathers it) and in the 3D layout (an all-reduce over tp_col of [b, s, d/tp_row]); the row-parallel outputs
and the depth-sharded weights add what they need, and nothing else runs.
"""
from __future__ import annotations

import pytest

from perfmodel.specs import ModelSpec, Plan
from tests.distributed.tp_driver import SEQ, grouped_on_other_inputs, layer_backward_collectives

SPEC = dict(n_layers=3)  # the middle Block is measured: neighbours on both sides
F32 = 4

CASES = [  # (world, plan fields)
    (2, dict(tp_col=2)),
    (2, dict(tp_col=2, sequence_parallel=True)),
    (8, dict(tp_col=2, tp_row=2, tp_depth=2)),
]


def expected(spec: ModelSpec, plan: Plan) -> dict[tuple[str, str], tuple[int, int]]:
    """(axis, kind) -> (calls, message bytes) of one Block's backward, one sample of SEQ tokens."""
    X, Y, Z = plan.tp_col, plan.tp_row, plan.tp_depth
    size = {"tp_col": X, "tp_row": Y, "tp_depth": Z}
    sp = plan.sequence_parallel and X > 1
    d, kv, ff = spec.d_model, spec.n_kv_heads * spec.head_dim, spec.d_ff
    out: dict[tuple[str, str], tuple[int, int]] = {}

    def add(axis: str, kind: str, elems: float) -> None:
        if size[axis] > 1:
            calls, nbytes = out.get((axis, kind), (0, 0))
            out[(axis, kind)] = (calls + 1, nbytes + int(elems) * F32)

    for _ in ("attention", "mlp"):  # the input gradient of each group of projections, once
        add("tp_col", "reduce_scatter" if sp else "all_reduce", SEQ * d / Y)
        if sp:
            add("tp_col", "all_gather", SEQ * d / Y)  # its input again, for the weight gradients
    for k in (d, ff):  # the row-parallel outputs wo, w_down
        if sp:
            add("tp_col", "all_gather", SEQ * d / Y)  # backward of the output's reduce-scatter
        add("tp_row", "all_reduce", SEQ * k / X)  # their input gradient (3D)
    for _ in range(2 * (1 if spec.norm == "rmsnorm" else 2)):  # norm statistics over tp_row
        add("tp_row", "all_reduce", SEQ / X if sp else SEQ)
    for k, n in ((d, d), (d, kv), (d, kv), (d, d), (d, ff), (d, ff), (ff, d)):  # wq wk wv wo gate up down
        add("tp_depth", "all_gather", k * n / (X * Y))  # gathered again (prefetched, one ahead)
        add("tp_depth", "reduce_scatter", k * n / (X * Y))  # the weight gradient
    return out


def wire(kind: str, nbytes: int, ranks: int) -> float:
    """Bytes each rank sends for a message (docs/architecture.md, Formulas: ring collectives)."""
    return (2 if kind == "all_reduce" else 1) * (ranks - 1) / ranks * nbytes


@pytest.mark.parametrize("world, plan_kw", CASES, ids=["1d", "1d-sp", "3d"])
def test_one_input_grad_reduction_per_group(dist_pools, world, plan_kw):
    spec, plan = ModelSpec(**SPEC), Plan(**plan_kw)
    want = expected(spec, plan)
    for rank, got in enumerate(dist_pools.run(world, layer_backward_collectives, plan_kw, SPEC)):
        assert got == want, f"rank {rank}: {got} != {want}"
        # over tp_col the Block moves what Megatron's two all-reduces of [b, s, d/tp_row] move (with
        # SP: plus the two input re-gathers, as Megatron-SP's backward)
        col = sum(wire(kind, nbytes, plan.tp_col) for (axis, kind), (_, nbytes) in got.items() if axis == "tp_col")
        message = SEQ * spec.d_model // plan.tp_row * F32
        regather = 2 * wire("all_gather", message, plan.tp_col) if plan.sequence_parallel else 0
        assert col == 2 * wire("all_reduce", message, plan.tp_col) + regather


def test_group_called_on_other_inputs_stays_exact(dist_pools):
    """The grouping is a speed-up only: projections of a group fed different inputs (wq(x1),
    wk(x2), wv(x1)) still give the outputs and gradients of the full weights."""
    for rank, errors in enumerate(dist_pools.run(2, grouped_on_other_inputs, dict(tp_col=2), SPEC)):
        assert len(errors) == 8 and max(errors.values()) < 1e-5, (rank, errors)
