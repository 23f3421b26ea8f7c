"""What the rules accept runs: a seeded sample of random plans of the tiny model that
perfmodel/rules.py accepts each builds and trains one step on gloo, and its first loss equals the
single-process run's (the initial weights and the global batch do not depend on the layout)."""
from __future__ import annotations

import random
from pathlib import Path

import pytest

from perfmodel import rules
from perfmodel.specs import Plan
from tests.distributed.trainer_driver import make_cfg, train
from tests.plan_sampler import random_plan

SAMPLES = 20
ONE_STEP = ["train.steps=1", "model.n_layers=4", "train.global_batch_size=8", "train.seq_len=32"]


def overrides(plan: Plan) -> list[str]:
    """The Hydra overrides that select `plan`."""
    default, out = Plan().to_dict(), []
    for key, value in plan.to_dict().items():
        if key == "offload":
            out += [f"parallel.offload.{k}={str(v).lower()}" for k, v in value.items()]
        elif value != default[key]:
            out.append(f"parallel.{key}={str(value).lower() if isinstance(value, bool) else value}")
    return out


def accepted_sample() -> list[Plan]:
    """SAMPLES distinct accepted plans over 1, 2 or 4 ranks, every other one pipelined."""
    model = make_cfg(Path("unused"), "x", *ONE_STEP).model
    rng, out = random.Random(1130), []
    while len(out) < SAMPLES:
        world = rng.choice((2, 4)) if len(out) % 2 else rng.choice((1, 2, 4))
        plan = random_plan(rng, world, invalid_knobs=False)
        if len(out) % 2 and plan.pp == 1:
            continue
        if plan not in out and not rules.violations(model, plan, world, 8, 32):
            out.append(plan)
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory, dist_pools):
    return dist_pools.run(1, train, make_cfg(tmp_path_factory.mktemp("ref"), "ref", *ONE_STEP))[0][1]


@pytest.mark.parametrize("plan", accepted_sample(), ids=lambda p: "-".join(overrides(p)[:-2]).replace("parallel.", ""))
def test_an_accepted_plan_runs_one_step(plan, reference, tmp_path, dist_pools):
    losses = dist_pools.run(plan.world_size, train, make_cfg(tmp_path, "run", *ONE_STEP, *overrides(plan)))[0][1]
    assert losses == pytest.approx(reference, rel=1e-4)
