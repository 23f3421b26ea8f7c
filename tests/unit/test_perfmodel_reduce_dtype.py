"""The performance model prices `parallel.reduce_dtype` as the runtime reduces: a bf16 copy moves
half the gradient bytes (tests/distributed/test_reduce_dtype.py measures the runtime's half)."""
from __future__ import annotations

import pytest

from perfmodel import rules
from perfmodel.estimate import MicrobatchCosts, gradient_sync
from perfmodel.memory import reduce_bytes
from perfmodel.specs import Cluster, Plan, PlanError


@pytest.mark.parametrize("zero", [0, 1, 2])
def test_bf16_reductions_cost_less(zero):
    c = Cluster()
    no_overlap = MicrobatchCosts(compute=0.0, recompute=0.0, tensor=0.0, context=0.0, backward=0.0)
    psi = 8e9 / 64  # a Block's worth of parameters per rank
    fp32, bf16 = (gradient_sync(Plan(dp=64, zero=zero, reduce_dtype=rd), c, psi, no_overlap, 4, 33)
                  for rd in ("fp32", "bf16"))
    assert reduce_bytes(Plan(reduce_dtype="bf16")) * 2 == reduce_bytes(Plan()) == 4
    assert 0 < bf16 < fp32


def test_unknown_reduce_dtype_names_the_setting():
    found = rules.setting_rules(Plan(reduce_dtype="fp16"))
    assert [v.knob for v in found] == ["parallel.reduce_dtype"]
    with pytest.raises(PlanError, match="parallel.reduce_dtype='fp16' is not one of"):
        rules.raise_if(found)
