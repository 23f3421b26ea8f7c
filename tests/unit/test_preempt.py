"""PreemptionHandler: signals set the flag, requested() reads it, requeue() calls scontrol on rank 0."""
import os
import signal
import stat
import time
from pathlib import Path

import pytest

from axon.preempt import PreemptionHandler


@pytest.fixture
def restore_signals():
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def _wait_for(handler: PreemptionHandler) -> None:
    deadline = time.monotonic() + 5.0  # Python runs handlers between bytecodes; this is immediate
    while handler.signum is None and time.monotonic() < deadline:
        time.sleep(0.001)


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_signal_sets_the_flag_and_nothing_else(restore_signals, sig):
    handler = PreemptionHandler.install()
    assert not handler.requested()
    os.kill(os.getpid(), sig)
    _wait_for(handler)
    assert handler.signum == sig
    assert handler.requested()
    assert handler.requested()  # reading does not clear it: every later boundary still sees it


def test_only_the_given_signals_are_caught(restore_signals):
    handler = PreemptionHandler.install(signals=(signal.SIGUSR1,))
    assert signal.getsignal(signal.SIGUSR1) == handler._on_signal
    assert signal.getsignal(signal.SIGTERM) != handler._on_signal


def _fake_scontrol(tmp_path: Path, rc: int = 0) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "scontrol"
    script.write_text(f'#!/bin/sh\necho "$@" >> "{tmp_path}/calls"\necho "refused" >&2\nexit {rc}\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return bin_dir


def test_requeue_calls_scontrol_with_the_job_id(tmp_path):
    environ = {"PATH": str(_fake_scontrol(tmp_path)), "SLURM_JOB_ID": "4242", "SLURM_PROCID": "0"}
    assert PreemptionHandler().requeue(environ) is True
    assert (tmp_path / "calls").read_text() == "requeue 4242\n"


def test_requeue_reports_a_refusal(tmp_path, capsys):
    environ = {"PATH": str(_fake_scontrol(tmp_path, rc=1)), "SLURM_JOB_ID": "7"}
    assert PreemptionHandler().requeue(environ) is False
    assert (tmp_path / "calls").read_text() == "requeue 7\n"
    assert "refused" in capsys.readouterr().err


def test_requeue_outside_slurm_does_nothing(tmp_path):
    environ = {"PATH": str(_fake_scontrol(tmp_path))}
    assert PreemptionHandler().requeue(environ) is False
    assert not (tmp_path / "calls").exists()


def test_requeue_without_scontrol_says_so(tmp_path, capsys):
    environ = {"PATH": str(tmp_path), "SLURM_JOB_ID": "9"}
    assert PreemptionHandler().requeue(environ) is False
    assert "scontrol is not on PATH" in capsys.readouterr().err
