"""Random parallel plans for the rule tests (tests/unit/test_rules.py, tests/distributed/
test_rules_runtime.py); a helper module, not a test. Degrees are a random factorisation of the
world size, every other knob is drawn from its values (and a few invalid ones)."""
from __future__ import annotations

import random

from perfmodel.schedules import SCHEDULES
from perfmodel.specs import Offload, Plan

DEGREES = ("dp", "pp", "cp", "tp_col", "tp_row", "tp_depth")


def factorise(rng: random.Random, world: int) -> dict[str, int]:
    """A random assignment of world's prime factors to the six degrees (product = world)."""
    degrees = dict.fromkeys(DEGREES, 1)
    n, p = world, 2
    while n > 1:
        while n % p == 0:
            degrees[rng.choice(DEGREES)] *= p
            n //= p
        p += 1
    return degrees


def random_plan(rng: random.Random, world: int, invalid_knobs: bool = True) -> Plan:
    """A plan over `world` ranks; with `invalid_knobs` some settings get out-of-range values."""
    odd = invalid_knobs and rng.random() < 0.05
    return Plan(**factorise(rng, world),
                zero=rng.choice((0, 1, 2, 3, 4) if odd else (0, 1, 2, 3)),
                sequence_parallel=rng.random() < 0.5,
                cp_mode=rng.choice(("ring", "ulysses")),
                schedule=rng.choice(SCHEDULES + (("magic",) if odd else ())),
                virtual_stages=rng.choice((1, 1, 2, 2, 3, 4)),
                micro_batch_size=rng.choice((1, 1, 2, 4, 3)),
                recompute=rng.choice(("none", "selective", "full")),
                offload=Offload(optimizer=rng.random() < 0.2, activations=rng.choice((0.0, 0.0, 0.5, 1.0))))
