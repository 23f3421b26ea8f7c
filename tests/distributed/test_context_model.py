"""Context parallelism on a whole tiny model: loss and every parameter gradient equal a
single-process run of the same model, seed and data (cp=2, and cp=2 x dp=2); bad layouts fail
before training with an error naming the setting."""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from axon.init import materialize
from axon.model import build
from launch.grid import Grid
from parallel import context
from perfmodel.specs import ModelSpec, Plan, PlanError

SEQ, BATCH, SEED = 24, 4, 3


def _loss_and_grads(model, tokens, positions, targets, global_tokens):
    logits = model(tokens, positions)  # [b, s, V]
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum") / global_tokens
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def _model_parity(spec: ModelSpec, plan: Plan) -> dict[str, float]:
    """Every rank: the reference on the full batch, then its own dp sample slice and cp shard."""
    rank, world = dist.get_rank(), dist.get_world_size()
    grid = Grid.build(plan, rank, world)
    data = torch.randint(spec.vocab_size, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(11))

    ref = build(spec)
    materialize(ref, spec, SEED, torch.device("cpu"))
    ref_loss, ref_grads = _loss_and_grads(ref, data[:, :-1], torch.arange(SEQ), data[:, 1:], BATCH * SEQ)

    model = build(spec)
    ctx = context.apply(model, spec, plan, grid)
    materialize(model, spec, SEED, torch.device("cpu"))
    per_dp = BATCH // plan.dp
    mine = data[grid.axis("dp").coord * per_dp:][:per_dp]  # [b, S+1]
    inputs, targets, positions = ctx.shard(mine)
    assert inputs.shape == (per_dp, ctx.local_tokens(1, SEQ))
    loss, grads = _loss_and_grads(model, inputs, positions, targets, BATCH * SEQ)
    reduce_group = grid.group("dp", "cp").group  # the default grad_axes
    dist.all_reduce(loss, group=reduce_group)
    errs = {"loss": abs(loss.item() - ref_loss.item()) / abs(ref_loss.item())}
    for name, g in grads.items():
        dist.all_reduce(g, group=reduce_group)
        # norm floored at 1e-5: the key bias gradient is 0 in exact arithmetic (softmax ignores
        # a constant added to every score of a query), so its reference is rounding noise
        errs[name] = ((g - ref_grads[name]).norm() / ref_grads[name].norm().clamp(min=1e-5)).item()
    return errs


GQA = ModelSpec(n_layers=2, d_model=48, n_heads=6, n_kv_heads=2, d_ff=64, vocab_size=64, max_seq_len=64)
LEARNED = ModelSpec(n_layers=2, d_model=32, n_heads=4, n_kv_heads=4, d_ff=64, vocab_size=64, max_seq_len=64,
                    pos="learned", norm="layernorm", mlp="gelu", tied_embeddings=True, bias=True)


@pytest.mark.parametrize("spec,plan", [
    (GQA, Plan(cp=2)),
    (GQA, Plan(cp=2, cp_mode="ulysses")),
    (LEARNED, Plan(cp=2, dp=2)),
    (GQA, Plan(cp=2, dp=2, cp_mode="ulysses")),
], ids=["cp2-ring", "cp2-ulysses", "cp2xdp2-ring-learned", "cp2xdp2-ulysses"])
def test_model_loss_and_grads_match_single_process(dist_pools, spec, plan):
    plan.check(spec, plan.world_size, BATCH, SEQ)
    for errs in dist_pools.run(plan.world_size, _model_parity, spec, plan):
        worst = max(errs, key=errs.get)
        assert errs[worst] < 1e-5, (worst, errs[worst])


def test_bad_sequence_length_names_the_setting():
    with pytest.raises(PlanError, match=r"train\.seq_len=20 .*2 \* parallel\.cp = 8"):
        Plan(cp=4).check(GQA, 4, BATCH, 20)
    with pytest.raises(PlanError, match=r"train\.seq_len=20"):
        context.ContextParallel(cp=4, coord=0, mode="ring").shard(torch.zeros(1, 21, dtype=torch.long))


def test_ulysses_heads_not_divisible_names_the_setting():
    with pytest.raises(PlanError, match=r"model\.n_heads=6 .*parallel\.cp.*parallel\.cp_mode=ring"):
        Plan(cp=4, cp_mode="ulysses").check(GQA, 4, BATCH, SEQ)
    Plan(cp=4, cp_mode="ring").check(GQA, 4, BATCH, SEQ)  # ring mode takes any head count
    core = context.UlyssesCore(inner=None, cp=4, group=None)
    q = torch.zeros(1, 6, 6, 8)
    with pytest.raises(PlanError, match=r"parallel\.cp=4.*parallel\.cp_mode=ring"):
        core(q, q[:, :, :2], q[:, :, :2])
