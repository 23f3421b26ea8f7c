"""PreemptionHandler across ranks: one rank's signal makes every rank stop; requeue runs on rank 0 only."""
import os
import signal
import stat
import tempfile
import time
from pathlib import Path

import torch.distributed as dist

from axon.preempt import PreemptionHandler


def _signal_on(rank_with_signal):
    saved = signal.getsignal(signal.SIGUSR1)
    try:
        handler = PreemptionHandler.install(signals=(signal.SIGUSR1,))
        before = handler.requested()
        if dist.get_rank() == rank_with_signal:
            os.kill(os.getpid(), signal.SIGUSR1)
            deadline = time.monotonic() + 5.0
            while handler.signum is None and time.monotonic() < deadline:
                time.sleep(0.001)
        return before, handler.requested()
    finally:
        signal.signal(signal.SIGUSR1, saved)


def _requeue_from_every_rank(calls_dir):
    bin_dir = Path(calls_dir) / f"bin{dist.get_rank()}"
    bin_dir.mkdir()
    script = bin_dir / "scontrol"
    script.write_text(f'#!/bin/sh\necho "$@" >> "{calls_dir}/calls"\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return PreemptionHandler().requeue({"PATH": str(bin_dir), "SLURM_JOB_ID": "55"})


def test_every_rank_agrees(dist_pools):
    assert dist_pools.run(4, _signal_on, 2) == [(False, True)] * 4


def test_requeue_runs_once_on_rank_zero(dist_pools):
    with tempfile.TemporaryDirectory() as calls_dir:
        assert dist_pools.run(2, _requeue_from_every_rank, calls_dir) == [True, False]
        assert (Path(calls_dir) / "calls").read_text() == "requeue 55\n"
