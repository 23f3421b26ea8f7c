"""A pool of long-lived gloo worker processes that run test functions on every rank.

One pool per world size is started once and reused by many tests (tests/distributed/conftest.py),
so tests pay the process start-up rarely (and little: workers fork from a forkserver that imported
torch and the trainer once); each task runs in a fresh gloo world over the pool's
kept rendezvous store, torn down with all its groups afterwards (launch/local.py). `pool.run(fn,
*args)` calls the importable function `fn` on every rank (with torch.distributed initialized) and returns
the per-rank results; an exception on any rank is re-raised here with that rank's traceback.
A pool that failed or timed out is torn down so the next test gets a fresh one.
"""
from __future__ import annotations

import gc
import multiprocessing as mp
import os
import queue
import time
import traceback
from typing import Any, Callable, Iterator

import torch.distributed as dist

from launch.local import free_port, join_generation, local_store


PRELOAD = ["torch", "torch.distributed.checkpoint", "axon.trainer", "tests.distributed.trainer_driver"]


def _worker(rank: int, world: int, port: int, tasks: Any, results: Any, timeout_s: float) -> None:
    gc.freeze()  # the preloaded modules' objects: the collection after each task skips them (0.3 s -> 0)
    store = local_store(rank, world, port, timeout_s)
    for generation, (fn, args, kwargs) in enumerate(iter(tasks.get, None)):
        join_generation(store, rank, world, generation, timeout_s)  # a fresh world per task
        try:
            results.put((rank, True, fn(*args, **kwargs)))
        except BaseException:  # noqa: BLE001 - report everything to the parent
            results.put((rank, False, traceback.format_exc()))
        dist.destroy_process_group()  # with every group the task built (and their gloo threads)
        gc.collect()


class WorkerPool:
    def __init__(self, world: int, timeout_s: float = 120.0):
        self.world = world
        self.timeout_s = timeout_s
        ctx = mp.get_context("forkserver")  # workers fork from a server that imported these once:
        ctx.set_forkserver_preload(PRELOAD)  # ~0.1 s a worker instead of ~4 s of imports each
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

    def close(self, grace_s: float = 0.2) -> None:
        """Ask the workers to exit; any still tearing torch down after `grace_s` is killed (idle
        between tasks, it holds nothing worth the ~2 s a clean interpreter exit takes)."""
        if not self.broken:
            for q in self.tasks:
                q.put(None)
            deadline = time.monotonic() + grace_s
            for p in self.procs:
                p.join(timeout=max(deadline - time.monotonic(), 0.0))
        for p in self.procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)


class Pools:
    def __init__(self) -> None:
        self._pools: dict[int, WorkerPool] = {}

    def run(self, world: int, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> list[Any]:
        """Run `fn(*args, **kwargs)` on every rank of a `world`-rank gloo job; per-rank results."""
        pool = self._pools.get(world)
        if pool is None:
            pool = self._pools[world] = WorkerPool(world)
        try:
            return pool.run(fn, *args, **kwargs)
        except BaseException:  # a failure, or pytest-timeout interrupting us mid-task: never reuse
            pool.broken = True
            raise
        finally:
            if pool.broken:
                pool.close()
                del self._pools[world]

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()


def package_pools() -> Iterator[Pools]:
    """The body of a package's `dist_pools` fixture (package scope: the pools live while that
    package's tests run, so the tests that follow do not share the cores with idle workers)."""
    pools = Pools()
    yield pools
    pools.close()
