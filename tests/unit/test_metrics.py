"""Run-directory logging: metrics.jsonl records, and wandb that is offline, missing or failing
never ends a run."""
from __future__ import annotations

import builtins
import json

import pytest

from axon.config import Logging
from axon.metrics import Reporter

RECORD = {"step": 1, "loss": 5.0, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 100.0, "step_time_s": 0.1,
          "mfu": 0.01, "peak_mem_bytes": 1}


def report(tmp_path, mode: str) -> list[dict]:
    r = Reporter(tmp_path, 3, 0, Logging(mode, "axon-test", None), {"a": 1}, progress=False, name="t")
    r.log(RECORD)
    r.close()
    return [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]


def test_metrics_jsonl(tmp_path):
    assert report(tmp_path, "disabled") == [RECORD]


def test_wandb_missing_warns_and_continues(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError("no wandb")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    with pytest.warns(UserWarning, match="wandb is not installed"):
        assert report(tmp_path, "offline") == [RECORD]


def test_wandb_init_failure_warns_and_continues(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")

    def boom(**kwargs):
        raise RuntimeError("network unreachable")

    monkeypatch.setattr(wandb, "init", boom)
    with pytest.warns(UserWarning, match="wandb.init failed"):
        assert report(tmp_path, "online") == [RECORD]


@pytest.mark.slow
def test_wandb_offline_writes_a_local_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    assert report(tmp_path, "offline") == [RECORD]
    assert list((tmp_path / "wandb").glob("offline-run-*")), "wandb offline wrote no run"
