"""A tiny worker for the launcher tests: detect the launcher, init torch.distributed, all-reduce.

usage: python -m tests.integration.launch_worker OUT_DIR MODE [TIMEOUT_S]
(always gloo, with CPU tensors, so the tests mean the same on a GPU machine)
  MODE sum:  all-reduce rank+1 once, write OUT_DIR/rank<r>.json with what it saw, print a line.
  MODE die:  loop of all-reduces; the last rank SIGKILLs itself at iteration 3.
  MODE hang: rank 0 all-reduces, the others sleep without joining (the timeout must fire).
  MODE fail-one: rank 0 ignores SIGTERM and sleeps, the others exit with code 3 once it does.
  MODE sleep: every rank sleeps (to be stopped from outside).
Every rank first writes its pid to OUT_DIR/pid<r>. The modes fail-one and sleep test only the
supervisor's handling of its processes: they neither import torch (seconds of CPU per worker)
nor build a process group.
Below main: functions the launch.local.spawn test runs on every rank.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

from launch.env import detect

NO_TORCH_MODES = ("fail-one", "sleep")


def main() -> None:
    out, mode = Path(sys.argv[1]), sys.argv[2]
    timeout_s = float(sys.argv[3]) if len(sys.argv) > 3 else 60.0
    env = detect(os.environ)
    (out / f"pid{env.rank}").write_text(str(os.getpid()))
    if mode in NO_TORCH_MODES:
        _without_torch(out, mode, env.rank, timeout_s)
        return
    import torch
    import torch.distributed as dist

    from launch import dist as launch_dist

    backend = launch_dist.init(env, "gloo", timeout_s)
    if mode == "sum":
        x = torch.tensor([float(env.rank + 1)])  # [1]
        dist.all_reduce(x)
        info = {"kind": env.kind, "rank": env.rank, "world_size": env.world_size, "local_rank": env.local_rank,
                "backend": backend, "sum": x.item(), "dist_rank": dist.get_rank(),
                "dist_world": dist.get_world_size(), "threads": torch.get_num_threads()}
        (out / f"rank{env.rank}.json").write_text(json.dumps(info))
        print(f"hello from rank {env.rank}", flush=True)
    elif mode == "die":
        for step in range(100_000):
            if step == 3 and env.rank == env.world_size - 1:
                os.kill(os.getpid(), signal.SIGKILL)
            dist.all_reduce(torch.ones(1024))
            time.sleep(0.01)
    elif mode == "hang":
        if env.rank == 0:
            dist.all_reduce(torch.ones(4))  # must raise after timeout_s
        else:
            time.sleep(600)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    launch_dist.shutdown()


def _without_torch(out: Path, mode: str, rank: int, timeout_s: float) -> None:
    if mode == "fail-one":
        ready = out / "ignoring-sigterm"  # rank 0 ignores SIGTERM before any rank fails
        if rank == 0:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the supervisor must escalate to SIGKILL
            ready.write_text("")
            time.sleep(600)
        deadline = time.monotonic() + timeout_s
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        raise SystemExit(3)
    time.sleep(600)  # sleep


# ---- functions for launch.local.spawn (run on every rank, torch.distributed initialized) ----

def rank_sum() -> tuple[int, float, int]:
    """(rank, the all-reduced sum of rank + 1, CPU threads)."""
    import torch
    import torch.distributed as dist

    x = torch.tensor([float(dist.get_rank() + 1)])  # [1]
    dist.all_reduce(x)
    return dist.get_rank(), x.item(), torch.get_num_threads()


def fail_on_rank(rank: int, how: str) -> None:
    """Rank `rank` raises (how="raise") or exits abruptly (how="exit"); the others wait in a barrier."""
    import torch.distributed as dist

    if dist.get_rank() == rank:
        if how == "raise":
            raise ValueError(f"rank {rank} fails on purpose")
        os._exit(7)
    dist.barrier()


if __name__ == "__main__":
    main()
