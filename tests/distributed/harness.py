"""A pool of long-lived gloo worker processes that run test functions on every rank.

One pool per world size is started once and reused by many tests (tests/distributed/conftest.py),
so tests pay the process start-up and rendezvous rarely. `pool.run(fn, *args)` calls the
importable function `fn` on every rank (with torch.distributed already initialized) and returns
the per-rank results; an exception on any rank is re-raised here with that rank's traceback.
A pool that failed or timed out is torn down so the next test gets a fresh one.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import queue
import traceback
from typing import Any, Callable

import torch.distributed as dist

from launch.grid import free_groups
from launch.local import free_port, init_local


def _worker(rank: int, world: int, port: int, tasks: Any, results: Any, timeout_s: float) -> None:
    init_local(rank, world, port, timeout_s)
    while True:
        task = tasks.get()
        if task is None:
            break
        fn, args, kwargs = task
        try:
            results.put((rank, True, fn(*args, **kwargs)))
        except BaseException:  # noqa: BLE001 - report everything to the parent
            results.put((rank, False, traceback.format_exc()))
        free_groups()  # the task's groups are unreachable now: free them (and their gloo threads) at once
    dist.destroy_process_group()


class WorkerPool:
    def __init__(self, world: int, timeout_s: float = 120.0):
        self.world = world
        self.timeout_s = timeout_s
        ctx = mp.get_context("spawn")
        port = free_port()
        self.tasks = [ctx.Queue() for _ in range(world)]
        self.results = ctx.Queue()
        env_threads = os.environ.get("OMP_NUM_THREADS")
        os.environ["OMP_NUM_THREADS"] = "1"
        self.procs = [ctx.Process(target=_worker, args=(r, world, port, self.tasks[r], self.results, timeout_s),
                                  daemon=True) for r in range(world)]
        for p in self.procs:
            p.start()
        if env_threads is None:
            del os.environ["OMP_NUM_THREADS"]
        else:
            os.environ["OMP_NUM_THREADS"] = env_threads
        self.broken = False

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> list[Any]:
        for q in self.tasks:
            q.put((fn, args, kwargs))
        out: dict[int, Any] = {}
        errors = []
        while len(out) + len(errors) < self.world:
            try:
                rank, ok, value = self.results.get(timeout=self.timeout_s * 2)
            except queue.Empty:
                self.broken = True
                dead = [r for r, p in enumerate(self.procs) if not p.is_alive()]
                raise TimeoutError(f"ranks did not finish {fn.__name__} in time (dead ranks: {dead})") from None
            if ok:
                out[rank] = value
            else:
                errors.append((rank, value))
        if errors:
            self.broken = True
            rank, tb = sorted(errors)[0]
            raise RuntimeError(f"rank {rank} failed in {fn.__name__}:\n{tb}")
        return [out[r] for r in range(self.world)]

    def close(self) -> None:
        if not self.broken:
            for q in self.tasks:
                q.put(None)
            for p in self.procs:
                p.join(timeout=10)
        for p in self.procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
