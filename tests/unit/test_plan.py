"""Plan validation: invalid layouts fail before any process group exists, naming the setting."""
import pytest

from perfmodel.specs import ModelSpec, Offload, Plan, PlanError

TINY = ModelSpec()


def check(plan: Plan, world: int = None, gbs: int = 16, seq: int = 128, model: ModelSpec = TINY):
    plan.check(model, plan.world_size if world is None else world, gbs, seq)


@pytest.mark.parametrize("plan,world,match", [
    (Plan(dp=3), 4, "parallel.dp"),
    (Plan(dp=2, tp_col=3), 6, "model.n_heads=4 is not divisible by parallel.tp_col"),
    (Plan(tp_depth=16), None, "model.d_ff=344 is not divisible by parallel.tp_col \\* parallel.tp_depth"),
    (Plan(pp=16), None, "model.n_layers=8 is fewer than parallel.pp=16"),
    (Plan(pp=4, schedule="interleaved", virtual_stages=4), None, "parallel.virtual_stages"),
    (Plan(pp=2, virtual_stages=3), None, "parallel.virtual_stages"),
    (Plan(dp=3), None, "train.global_batch_size=16 is not divisible"),
    (Plan(dp=2, micro_batch_size=3), None, "parallel.micro_batch_size"),
    (Plan(cp=3), None, "2 \\* parallel.cp"),
    (Plan(cp=8, cp_mode="ulysses"), None, "parallel.cp_mode=ring"),
    (Plan(zero=4), None, "parallel.zero"),
    (Plan(schedule="magic"), None, "parallel.schedule"),
    (Plan(recompute="some"), None, "parallel.recompute"),
    (Plan(offload=Offload(activations=1.5)), None, "parallel.offload.activations"),
    (Plan(dp=0), 0, "parallel.dp=0"),
])
def test_invalid_plans_name_the_setting(plan, world, match):
    with pytest.raises(PlanError, match=match):
        check(plan, world)


def test_bad_model_shapes():
    with pytest.raises(PlanError, match="model.d_model"):
        check(Plan(), model=ModelSpec(d_model=130))
    with pytest.raises(PlanError, match="model.n_kv_heads"):
        check(Plan(), model=ModelSpec(n_kv_heads=3))
    with pytest.raises(PlanError, match="train.seq_len / parallel.cp = 127 tokens over parallel.tp_col=2"):
        check(Plan(tp_col=2, sequence_parallel=True), seq=127)
    with pytest.raises(PlanError, match="model.tied_embeddings"):
        check(Plan(tp_col=2), model=ModelSpec(tied_embeddings=True))
    with pytest.raises(PlanError, match="model.max_seq_len"):
        check(Plan(), seq=4096)


def test_valid_plans_pass():
    check(Plan(dp=4))
    check(Plan(dp=2, pp=2, tp_col=2), gbs=16)
    check(Plan(dp=2, micro_batch_size=4), gbs=16)
    assert Plan(dp=2, tp_depth=2, micro_batch_size=2).microbatches(16) == 2


def test_plan_dict_round_trip():
    p = Plan(dp=2, offload=Offload(optimizer=True, activations=0.25), schedule="zbv")
    assert Plan.from_dict(p.to_dict()) == p
    with pytest.raises(PlanError, match="unknown parallel setting"):
        Plan.from_dict({"dpp": 2})
