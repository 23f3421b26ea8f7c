"""perfmodel/rules.py is the one place validity is decided: the search proposes exactly the plans
`Plan.check` accepts (a seeded property test over random plans), every violation names its
knob, and the reproductions of the disagreements that made the rules one module are rejected."""
from __future__ import annotations

import random

import pytest

from perfmodel import rules
from perfmodel.search import search
from perfmodel.specs import Cluster, ModelSpec, Plan, PlanError
from tests.plan_sampler import random_plan

MODELS = (
    ModelSpec(n_layers=8, d_model=64, n_heads=4, n_kv_heads=2, d_ff=128, vocab_size=256, max_seq_len=128),
    ModelSpec(n_layers=6, d_model=48, n_heads=6, n_kv_heads=3, d_ff=96, vocab_size=96, max_seq_len=128,
              tied_embeddings=True),
    ModelSpec(n_layers=4, d_model=96, n_heads=12, n_kv_heads=4, d_ff=192, vocab_size=120, max_seq_len=64,
              pos="learned", mlp="gelu", norm="layernorm"),
)
ROOMY = Cluster(hbm_bytes=1e30, host_bytes=1e30)  # memory never decides: only validity does
PLANS = 1200


def pinned(plan: Plan) -> dict:
    """Every knob of `plan` as a search constraint."""
    d = plan.to_dict()
    off = d.pop("offload")
    return {**d, "offload.optimizer": off["optimizer"], "offload.activations": off["activations"]}


def test_search_accepts_exactly_what_check_accepts():
    rng = random.Random(20261130)
    accepted = rejected = 0
    knobs: set[str] = set()
    for _ in range(PLANS):
        m = rng.choice(MODELS)
        world = rng.choice((1, 2, 3, 4, 6, 8, 12, 16))
        plan = random_plan(rng, world)
        gbs = rng.choice((1, 2, 4, 6, 8, 12, 16, 24, 32, 48, 64))
        seq = rng.choice((16, 24, 32, 48, 60, 64, 96))
        found = rules.violations(m, plan, world, gbs, seq)
        result = search(m, ROOMY, world, pinned(plan), gbs, seq, top=1).estimates
        assert bool(result) == (not found), (plan, m, gbs, seq, [v.message for v in found])
        if result:
            accepted += 1
            assert result[0].plan == plan
        else:
            rejected += 1
            knobs.update(v.knob for v in found)
    print(f"{accepted} accepted, {rejected} rejected")
    assert accepted >= 100 and rejected >= 100, (accepted, rejected)  # both sides exercised
    assert {"parallel.tp_col", "parallel.virtual_stages", "train.global_batch_size", "parallel.cp",
            "model.tied_embeddings", "parallel.cp_mode"} <= knobs


def test_free_search_picks_only_valid_plans():
    for m in MODELS:
        for world in (4, 8):
            for est in search(m, ROOMY, world, {}, 16, 32, top=50).estimates:
                assert rules.violations(m, est.plan, world, 16, 32) == []


def test_every_violation_names_a_setting():
    rng = random.Random(7)
    for _ in range(300):
        m = rng.choice(MODELS)
        for v in rules.violations(m, random_plan(rng, 8), 8, rng.choice((4, 6, 16)), rng.choice((30, 32))):
            assert v.knob.split(".")[0] in ("parallel", "model", "train") and v.knob in v.message


def test_interleaved_microbatches_use_the_real_count():
    """The reproduction of issue 13: pp=4 interleaved with 6 microbatches per step passed every
    check (the pipeline's used pp as the microbatch count) and every rank died at step 1."""
    m = ModelSpec(n_layers=8)
    plan = Plan(pp=4, schedule="interleaved", virtual_stages=2, micro_batch_size=1)
    with pytest.raises(PlanError, match="microbatches per step \\(6\\) to be a multiple of parallel.pp=4"):
        plan.check(m, 4, 6, 128)
    plan.check(m, 4, 8, 128)


def test_tune_never_proposes_tensor_parallelism_with_tied_embeddings():
    """gpt2-124m (tied embeddings) on 8 devices: the search proposed tp and Plan.check rejected it."""
    gpt2 = ModelSpec(n_layers=12, d_model=768, n_heads=12, n_kv_heads=12, d_ff=3072, vocab_size=50304,
                     max_seq_len=1024, tied_embeddings=True, pos="learned", mlp="gelu", norm="layernorm")
    ests = search(gpt2, ROOMY, 8, {}, 64, 1024, top=100).estimates
    assert ests and all(e.plan.tp == 1 and e.plan.pp == 1 for e in ests)


def test_all_violations_are_reported_at_once():
    with pytest.raises(PlanError) as err:
        Plan(tp_col=3, cp=3, zero=7).check(ModelSpec(), 9, 16, 128)
    assert "parallel.zero=7" in str(err.value) and "parallel.tp_col" in str(err.value) \
        and "2 * parallel.cp" in str(err.value) and "\n" not in str(err.value)


def test_the_reproduction_is_rejected_before_any_process_starts(capsys):
    from axon.train import main

    rc = main(["launch.nproc_per_node=4", "parallel.pp=4", "parallel.schedule=interleaved",
               "parallel.virtual_stages=2", "train.global_batch_size=6", "parallel.micro_batch_size=1",
               "model.n_layers=8", "logger.wandb.mode=disabled"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "train.global_batch_size" in err and "parallel.pp=4" in err
