"""Worker pools (one per world size) shared by the distributed tests of this package. A pool
lives while this package's tests run (package scope: the integration tests that follow do not
share the cores with idle workers)."""
from __future__ import annotations

from typing import Any, Callable

import pytest

from tests.distributed.harness import WorkerPool


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


@pytest.fixture(scope="package")
def dist_pools():
    pools = Pools()
    yield pools
    pools.close()
