"""Local gloo worlds on 127.0.0.1 for tests, benchmarks and calibration.

`init_local` makes this process rank `rank` of a `world`-rank gloo group that meets at
127.0.0.1:`port` (`free_port()` picks one), with one CPU thread per rank so that many ranks share
few cores. A long-lived process that runs many jobs in turn (the test worker pools, the validation
benchmark) keeps one rendezvous store (`local_store`) and starts a fresh world per job with
`join_generation`; `dist.destroy_process_group()` after the job frees every group it built. `spawn(world, fn, *args)` starts `world` fresh processes, runs the importable
`fn(*args)` on each with the group initialized, and returns every rank's result; a rank that
raises or dies stops the others and fails the call with that rank's traceback or exit code.
Real jobs start through `launch.dist.init` (and `launch.spawn.run_local` for local workers).
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
import traceback
from datetime import timedelta
from multiprocessing.connection import wait
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from launch.dist import free_port

__all__ = ["HOST", "free_port", "init_local", "join_generation", "local_store", "spawn"]

HOST = "127.0.0.1"
FAILURE_GRACE_S = 5.0  # after one rank fails: how long the others get to report theirs, then to exit


def init_local(rank: int, world: int, port: int, timeout_s: float = 600.0, threads: int = 1) -> None:
    """Join the `world`-rank gloo group at 127.0.0.1:`port` as `rank`, using `threads` CPU threads.
    A collective whose peer died or stopped fails after `timeout_s` instead of hanging."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside a world of {world} ranks: pass 0 <= rank < world")
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"tcp://{HOST}:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))


def local_store(rank: int, world: int, port: int, timeout_s: float = 600.0) -> dist.TCPStore:
    """The rendezvous store of a `world`-rank local job at 127.0.0.1:`port` (rank 0 hosts it)."""
    return dist.TCPStore(HOST, port, world, is_master=rank == 0, timeout=timedelta(seconds=timeout_s))


def join_generation(store: dist.Store, rank: int, world: int, generation: int, timeout_s: float = 600.0,
                    threads: int = 1) -> None:
    """Join generation `generation` of the gloo world that meets over `store` (each generation
    under its own key prefix, so one store serves a fresh world per job)."""
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", store=dist.PrefixStore(f"generation{generation}/", store), rank=rank,
                            world_size=world, timeout=timedelta(seconds=timeout_s))


def spawn(world: int, fn: Callable[..., Any], *args: Any, timeout_s: float = 600.0) -> list[Any]:
    """Run `fn(*args)` on `world` new gloo ranks (one CPU thread each); the per-rank return values.

    `fn` must be importable (a module-level function) and its results tensors, numbers, strings
    and containers of them: they come back through torch.save / torch.load(weights_only=True). When a rank raises or dies, the others get FAILURE_GRACE_S to report
    their own errors and are then stopped, and RuntimeError names the first failed rank with its
    traceback (or exit code), then any later failures (often just the peers losing it)."""
    if world < 1:
        raise ValueError(f"spawn needs world >= 1 ranks, got {world}")
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="axon_spawn_") as out:
        port = free_port(HOST)
        procs = [ctx.Process(target=_entry, args=(r, world, port, timeout_s, out, fn, args)) for r in range(world)]
        try:
            for p in procs:
                p.start()
            _wait(procs)
        finally:
            stopped = _stop(procs)
        failed = _failed(procs, stopped, out)
        if failed:
            raise RuntimeError(_failure_report(fn, procs, failed, stopped, out))
        return [torch.load(os.path.join(out, f"{r}.pt"), weights_only=True) for r in range(world)]


def _entry(rank: int, world: int, port: int, timeout_s: float, out: str, fn: Callable[..., Any],
           args: tuple) -> None:
    try:
        init_local(rank, world, port, timeout_s)
        torch.save(fn(*args), os.path.join(out, f"{rank}.pt"))
        dist.barrier()  # rank 0 hosts the rendezvous store: it leaves last
    except BaseException:  # noqa: BLE001 - the parent reports it (with when it happened)
        with open(os.path.join(out, f"{rank}.err"), "w") as f:
            f.write(f"{time.time()}\n{traceback.format_exc()}")
        sys.exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _wait(procs: list) -> None:
    """Until every rank has exited, or one failed and the others had FAILURE_GRACE_S to follow."""
    live = list(procs)
    while live:
        wait([p.sentinel for p in live])
        live = [p for p in live if p.exitcode is None]
        if any(p.exitcode not in (None, 0) for p in procs):
            wait([p.sentinel for p in live], timeout=FAILURE_GRACE_S)
            return


def _stop(procs: list) -> set[int]:
    """Terminate the ranks still running (SIGKILL after FAILURE_GRACE_S) and reap all; the ranks stopped."""
    stopped = {r for r, p in enumerate(procs) if p.is_alive()}
    for r in stopped:
        procs[r].terminate()
    for p in procs:
        if p.pid is not None:
            p.join(FAILURE_GRACE_S)
            if p.is_alive():
                p.kill()
                p.join()
    return stopped


def _failed(procs: list, stopped: set[int], out: str) -> list[int]:
    """The ranks that failed: exited non-zero unless stopped by us, and every rank that reported
    its own exception (`_entry` writes `<rank>.err`) even if it was stopped on its way out: under
    load its teardown can outlast the grace a peer's quicker failure started."""
    return [r for r, p in enumerate(procs)
            if (p.exitcode != 0 and r not in stopped) or os.path.exists(os.path.join(out, f"{r}.err"))]


def _failure_report(fn: Callable[..., Any], procs: list, failed: list[int], stopped: set[int], out: str) -> str:
    """The failed ranks, root cause first: a rank that died without a Python exception (killed,
    os._exit), else the earliest exception; then the others, and the ranks stopped."""
    found = {}
    for r in failed:
        path = os.path.join(out, f"{r}.err")
        if os.path.exists(path):
            with open(path) as f:
                when, _, tb = f.read().partition("\n")
            found[r] = (float(when), tb)
        else:
            code = procs[r].exitcode
            how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
            found[r] = (float("-inf"), f"{how} without a Python exception\n")
    first, *rest = sorted(failed, key=lambda r: found[r][0])
    text = f"rank {first} failed in {fn.__name__}:\n{found[first][1]}"
    for r in rest:
        text += f"\nthen rank {r}: {found[r][1].strip().splitlines()[-1]}"
    still = sorted(stopped - set(failed))  # stopped without an error of their own
    if still:
        text += f"\nranks {still} were still running and were stopped"
    return text
