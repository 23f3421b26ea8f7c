"""GEMM layout tuning (kernels/gemm.py, kernels/gemm_tuning.py): every formulation of each of a Linear's three GEMMs
against the plain product, the Linear Function against F.linear (bitwise untuned; with other
layouts within fp32 rounding), tuning on CPU, the decision files (round trip, refusal of
malformed or hostile ones), agreement over two gloo ranks, and a whole model with every decision
non-default against the untuned model.

Tolerances: fp32 rtol = atol = 1e-5 against the fp32 product (the formulations only sum in
another order); bf16 rtol = atol = 2e-2 against the fp32 product of the same bf16 inputs (one
bf16 rounding of the result, 2^-8 relative); the model: fp32, 1e-6 relative in norm.
"""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import kernels
from axon.init import materialize
from axon.model import build
from kernels import gemm, gemm_tuning
from perfmodel import rules
from perfmodel.specs import ModelSpec

SHAPES = [(1, 1, 1), (7, 13, 5), (33, 17, 65), (96, 80, 72)]  # (tokens M, out N, in K)
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}
NON_DEFAULT = {"fwd": "sNN", "dx": "TT", "dw": "NT"}  # a copy, a swap, both


def operands(m: int, n: int, k: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(dtype) for s in ((m, k), (n, k), (m, n), (n,))]  # x, w, dy, b


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_every_formulation_equals_the_product(shape, dtype):
    x, w, dy, b = operands(*shape, dtype)
    want = {"fwd": x.float() @ w.float().t() + b.float(), "dx": dy.float() @ w.float(), "dw": dy.float().t() @ x.float()}
    for form in gemm.FORMS:
        got = {"fwd": gemm.forward(x, w, b, form), "dx": gemm.input_grad(dy, w, form),
               "dw": gemm.weight_grad(dy, x, form)}
        for role in gemm.ROLES:
            assert got[role].dtype == dtype and got[role].shape == want[role].shape
            torch.testing.assert_close(got[role].float(), want[role], **TOL[dtype], msg=f"{role} {form}")
        assert got["fwd"].is_contiguous() and got["dx"].is_contiguous()
        acc = torch.ones(shape[0], shape[2], dtype=dtype)  # input gradients summed in place (grouped projections)
        gemm.input_grad(dy, w, form, acc=acc)
        torch.testing.assert_close(acc.float(), want["dx"] + 1, **TOL[dtype], msg=f"acc {form}")


def test_default_formulations_are_torch_own_bitwise():
    x, w, dy, b = operands(96, 80, 72, torch.float32)
    assert torch.equal(gemm.forward(x, w, b, gemm.DEFAULT["fwd"]), F.linear(x, w, b))
    assert torch.equal(gemm.input_grad(dy, w, gemm.DEFAULT["dx"]), dy.mm(w))
    assert torch.equal(gemm.weight_grad(dy, x, gemm.DEFAULT["dw"]), x.t().mm(dy).t())


def table_of(choices: dict[str, str], shapes, dtype=torch.float32) -> gemm_tuning.GemmTable:
    table = gemm_tuning.GemmTable(gemm_tuning.device_key(torch.device("cpu")))
    for m, n, k in shapes:
        for role, form in choices.items():
            table.set((role, m, n, k, str(dtype).removeprefix("torch.")), form)
    return table


@pytest.mark.parametrize("lead", [(), (3,), (2, 5)], ids=["2d", "3d", "4d"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_linear_function_matches_f_linear(lead, bias):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*lead, 11, 24, generator=g)
    w, b = torch.randn(40, 24, generator=g), torch.randn(40, generator=g) if bias else None
    dy = torch.randn(*lead, 11, 40, generator=g)
    m = x.numel() // 24

    def run(fn):
        leaves = [t.clone().requires_grad_() for t in (x, w) + ((b,) if bias else ())]
        y = fn(leaves[0], leaves[1], leaves[2] if bias else None)
        y.backward(dy)
        return [y.detach()] + [t.grad for t in leaves]

    want = run(F.linear)
    exact = run(lambda xi, wi, bi: kernels.linear(xi, wi, bi, None))
    tuned = run(lambda xi, wi, bi: kernels.linear(xi, wi, bi, table_of(NON_DEFAULT, [(m, 40, 24)])))
    for a, e, t in zip(want, exact, tuned):
        if len(lead) < 2:  # F.linear runs one addmm / mm on <= 3-D inputs: the same calls
            assert torch.equal(e, a)
        torch.testing.assert_close(e, a, **TOL[torch.float32])
        torch.testing.assert_close(t, a, **TOL[torch.float32])


def test_linear_under_autocast_matches_f_linear():
    g = torch.Generator().manual_seed(2)
    x, w, b = torch.randn(4, 6, 32, generator=g), torch.randn(16, 32, generator=g), torch.randn(16, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, got = F.linear(x, w, b), kernels.linear(x, w, b)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)


def test_tune_records_a_decision_per_shape_and_role_once():
    table = gemm_tuning.GemmTable(gemm_tuning.device_key(torch.device("cpu")))
    shapes = {(16, 24, 8), (5, 7, 3)}
    assert table.tune(shapes, torch.device("cpu"), torch.float32, warmup=1, reps=2) == 6
    decided = table.decisions()
    assert set(decided) == {(r, m, n, k, "float32") for m, n, k in shapes for r in gemm.ROLES}
    assert all(set(times) == set(gemm.FORMS) and min(times.values()) > 0 for times in table.times.values())
    assert table.tune(shapes, torch.device("cpu"), torch.float32) == 0  # nothing left to time
    for (role, m, n, k, _), form in decided.items():
        assert table.choice(role, m, n, k, torch.float32) == form
    assert table.choice("fwd", 99, 1, 1, torch.float32) == gemm.DEFAULT["fwd"]  # untuned shape


def test_save_load_round_trip(tmp_path):
    table = table_of(NON_DEFAULT, [(8, 4, 2)])
    table.times[(table.device, table.version, ("fwd", 8, 4, 2, "float32"))] = {"TN": 3.5, "sNN": 1.25}
    other = gemm_tuning.GemmTable("another GPU")  # kept in the file, never used here
    other.set(("dx", 8, 4, 2, "bfloat16"), "TT")
    table.merge(other)
    path = tmp_path / "sub" / gemm_tuning.RUN_FILE
    table.save(path)
    assert [p.name for p in path.parent.iterdir()] == [gemm_tuning.RUN_FILE]  # no temporary left behind
    back = gemm_tuning.GemmTable.load(path, table.device)
    assert back.entries == table.entries and back.times == table.times
    assert back.decisions() == table.decisions() and len(back.entries) == 4
    assert gemm_tuning.GemmTable.load(tmp_path / "absent.json", "x").entries == {}


GOOD = {"device": "d", "torch": "t", "role": "fwd", "m": 1, "n": 2, "k": 3, "dtype": "float32", "form": "TN"}


@pytest.mark.parametrize("text", [
    "not json", "[]", '{"format": "axon.gemm_table", "version": 1}',
    json.dumps({"format": "pickle", "version": 1, "entries": []}),
    json.dumps({"format": "axon.gemm_table", "version": 1, "entries": [{**GOOD, "m": "__import__('os')"}]}),
    json.dumps({"format": "axon.gemm_table", "version": 1, "entries": [{**GOOD, "m": True}]}),
    json.dumps({"format": "axon.gemm_table", "version": 1, "entries": [{**GOOD, "n": 0}]}),
    json.dumps({"format": "axon.gemm_table", "version": 1, "entries": [{**GOOD, "form": "os.system"}]}),
    json.dumps({"format": "axon.gemm_table", "version": 1, "entries": [{**GOOD, "extra": 1}]}),
    json.dumps({"format": "axon.gemm_table", "version": 1, "entries": [{**GOOD, "times_us": {"TN": "1"}}]}),
    '{"format": "axon.gemm_table", "version": 1, "entries": [{"device": "d", "torch": "t", "role": "fwd", "m": 1, '
    '"n": 2, "k": 3, "dtype": "float32", "form": "TN", "times_us": {"TN": NaN}}]}',
], ids=["text", "list", "no-entries", "format", "code-in-int", "bool", "zero", "form", "extra", "times", "nan"])
def test_malformed_or_hostile_files_are_refused(tmp_path, text):
    path = tmp_path / "t.json"
    path.write_text(text)
    with pytest.raises(gemm_tuning.GemmTableError) as err:
        gemm_tuning.GemmTable.load(path, "d")
    message = str(err.value)
    assert "\n" not in message and str(path) in message and "model.gemm_cache" in message


def test_cache_file_stays_in_its_directory(tmp_path):
    for device in ("../../etc/passwd", "/abs/path", "NVIDIA H200", "..", ""):
        path = gemm_tuning.cache_path(tmp_path, device)
        assert path.parent == tmp_path and path.name.startswith("gemm_") and "/" not in path.name


def test_setting_is_validated_and_resolved():
    assert [v.knob for v in rules.model_rules(ModelSpec(gemm_tuning="sometimes"))] == ["model.gemm_tuning"]
    assert [v.knob for v in rules.model_rules(ModelSpec(gemm_cache=" "))] == ["model.gemm_cache"]
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert [gemm_tuning.tuning_on(m, cpu) for m in gemm_tuning.MODES] == [False, True, False]
    assert [gemm_tuning.tuning_on(m, gpu) for m in gemm_tuning.MODES] == [True, True, False]


def test_agree_takes_the_lowest_rank_decision_per_key():
    tables = [gemm_tuning.GemmTable("cpu test") for _ in range(2)]
    for rank, table in enumerate(tables):
        table.set(("fwd", 8, 4, 2, "float32"), ["sNN", "TT"][rank], {"TN": 1.0})  # conflicting: rank 0's wins
        table.set(("dw", 8, 4, 2 + rank, "bfloat16"), "NN")  # one shape per rank: both kept
    rows = [table.rows() for table in tables]
    for table in tables:
        table.adopt(rows)
    assert tables[0].decisions() == tables[1].decisions() == {
        ("fwd", 8, 4, 2, "float32"): "sNN", ("dw", 8, 4, 2, "bfloat16"): "NN", ("dw", 8, 4, 3, "bfloat16"): "NN"}
    assert len(tables[0].times) == 1 and not tables[1].times  # rank 1's timing was for the choice it lost


def test_agree_collective_on_one_gloo_rank():
    """The collective path (all-gather of counts, then of padded rows) in-process; the merging of
    several ranks is the test above (a two-process pool costs more than this file's budget)."""
    table = table_of(NON_DEFAULT, [(8, 4, 2), (3, 5, 7)])
    before = table.decisions()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        table.agree()
    finally:
        dist.destroy_process_group()
    assert table.decisions() == before


SPEC = ModelSpec(n_layers=2, d_model=48, n_heads=4, n_kv_heads=2, d_ff=100, vocab_size=96, max_seq_len=64,
                 kernels="torch")


def model_run(spec: ModelSpec, choices: dict[str, str] | None):
    model = build(spec)
    materialize(model, spec, seed=5, device=torch.device("cpu"))
    tokens = torch.randint(0, spec.vocab_size, (2, 17), generator=torch.Generator().manual_seed(6))
    if choices is not None:
        table = table_of(choices, gemm.shapes(model, 2 * 16))
        gemm.attach(model, table)
        assert len(gemm.linears(model)) == 7 * spec.n_layers + 1 and len(table.decisions()) == 3 * 5
    logits = model(tokens[:, :-1])  # [2, 16, V]
    F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_model_with_every_decision_non_default_equals_untuned(bias):
    spec = replace(SPEC, bias=bias)
    (lt, gt), (lr, gr) = model_run(spec, NON_DEFAULT), model_run(spec, None)
    assert (lt - lr).norm() <= 1e-6 * lr.norm()
    for name in gr:
        assert (gt[name] - gr[name]).norm() <= 1e-6 * gr[name].norm(), name


def test_for_run_tunes_once_then_reuses_the_cache(tmp_path):
    spec = replace(SPEC, n_layers=1)
    cpu = torch.device("cpu")
    model = build(spec)
    assert gemm_tuning.for_run("auto", None, tmp_path / "a", cpu, torch.float32, [model], 8, True) is None  # auto: off on CPU
    table = gemm_tuning.for_run("on", None, tmp_path / "a", cpu, torch.float32, [model], 8, True)
    assert len(table.decisions()) == 3 * 5 and model.layers["0"].attn.wq.gemm_table is table
    cache = gemm_tuning.cache_path(tmp_path / "gemm_cache", table.device)
    assert gemm_tuning.GemmTable.load(tmp_path / "a" / gemm_tuning.RUN_FILE, table.device).decisions() == table.decisions()
    forced = gemm_tuning.GemmTable.load(cache, table.device)  # a later run takes the cached decisions, untimed
    forced.set(("fwd", 8, 48, 48, "float32"), "sTT")
    forced.save(cache)
    again = gemm_tuning.for_run("on", None, tmp_path / "b", cpu, torch.float32, [build(spec)], 8, True)
    assert again.choice("fwd", 8, 48, 48, torch.float32) == "sTT" and again.decisions().keys() == table.decisions().keys()
