"""PreemptionHandler across ranks: one rank's signal makes every rank stop with the same exit code
(the largest signal number received); requeue runs on rank 0 only."""
import os
import signal
import stat
import tempfile
import time
from pathlib import Path

import torch.distributed as dist

from axon.preempt import PreemptionHandler


def _signal_on(signals_by_rank):
    """Rank r sends itself signals_by_rank.get(r); returns (requested before, after, exit code)."""
    stops = (signal.SIGUSR1, signal.SIGTERM)
    saved = {sig: signal.getsignal(sig) for sig in stops}
    try:
        handler = PreemptionHandler.install(signals=stops)
        before = handler.requested()
        sig = signals_by_rank.get(dist.get_rank())
        if sig is not None:
            os.kill(os.getpid(), sig)
            deadline = time.monotonic() + 5.0
            while handler.signum is None and time.monotonic() < deadline:
                time.sleep(0.001)
        return before, handler.requested(), handler.exit_code()
    finally:
        for sig, previous in saved.items():
            signal.signal(sig, previous)


def _requeue_from_every_rank(calls_dir):
    bin_dir = Path(calls_dir) / f"bin{dist.get_rank()}"
    bin_dir.mkdir()
    script = bin_dir / "scontrol"
    script.write_text(f'#!/bin/sh\necho "$@" >> "{calls_dir}/calls"\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return PreemptionHandler().requeue({"PATH": str(bin_dir), "SLURM_JOB_ID": "55"})


def test_every_rank_agrees(dist_pools):
    assert dist_pools.run(4, _signal_on, {2: signal.SIGUSR1}) == [(False, True, 128 + signal.SIGUSR1)] * 4


def test_every_rank_exits_with_the_largest_signal_received(dist_pools):
    got = dist_pools.run(4, _signal_on, {1: signal.SIGUSR1, 3: signal.SIGTERM})
    assert got == [(False, True, 128 + signal.SIGTERM)] * 4


def test_requeue_runs_once_on_rank_zero(dist_pools):
    with tempfile.TemporaryDirectory() as calls_dir:
        assert dist_pools.run(2, _requeue_from_every_rank, calls_dir) == [True, False]
        assert (Path(calls_dir) / "calls").read_text() == "requeue 55\n"
