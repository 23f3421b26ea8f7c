"""The (schedule, pp, microbatches, virtual_stages) grid the closed forms are checked against the
simulator on (shared by the performance-model unit tests; not a test module)."""
from perfmodel.schedules import SCHEDULES, V_SHAPED

PP = (2, 4, 8)
MICROBATCHES = (1, 2, 4, 8, 16, 32)


def grid() -> list[tuple[str, int, int, int]]:
    """Every pipelined schedule with its allowed virtual stages (interleaved: 2 and 4, with m a
    multiple of pp as the rules require)."""
    out = []
    for sched in SCHEDULES:
        if sched == "none":
            continue
        for p in PP:
            for m in MICROBATCHES:
                vs = (2, 4) if sched == "interleaved" else (2,) if sched in V_SHAPED else (1,)
                out += [(sched, p, m, v) for v in vs if sched != "interleaved" or m % p == 0]
    return out
