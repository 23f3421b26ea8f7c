"""Run-directory logging: metrics.jsonl records (a torn line from a crash mid-write is skipped
and dropped at the next resume), atomic rewrites, and wandb that is offline, missing or failing
never ends a run."""
from __future__ import annotations

import builtins
import json

import pytest

from axon.config import Logging
from axon.metrics import Reporter, read_metrics, truncate_metrics, write_text_atomic

RECORD = {"step": 1, "loss": 5.0, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 100.0, "step_time_s": 0.1,
          "mfu": 0.01, "peak_mem_bytes": 1}


def report(tmp_path, mode: str) -> list[dict]:
    r = Reporter(tmp_path, 3, 0, Logging(mode, "axon-test", None), {"a": 1}, progress=False, name="t")
    r.log(RECORD)
    r.close()
    return [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]


def test_metrics_jsonl(tmp_path):
    assert report(tmp_path, "disabled") == [RECORD]


def test_torn_tail_line_is_skipped_and_truncation_drops_it(tmp_path):
    path = tmp_path / "metrics.jsonl"
    good = [dict(RECORD, step=s) for s in (1, 2, 3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in good) + '{"step": 4, "loss": 4.')  # killed mid-write
    assert read_metrics(path) == good
    truncate_metrics(path, 2)  # a resume from step 2
    assert read_metrics(path) == good[:2]
    assert path.read_text().endswith("\n") and len(path.read_text().splitlines()) == 2
    # the resumed run appends after a torn line that was not truncated away: both parse apart
    path.write_text(json.dumps(good[0]) + "\n" + '{"step": 2, "lo')
    with path.open("a") as f:
        f.write(json.dumps(good[1]) + "\n")
    assert read_metrics(path) == [good[0]]  # the glued line is dropped, never a JSONDecodeError
    truncate_metrics(path, 5)
    assert read_metrics(path) == [good[0]]


def test_atomic_rewrite_leaves_no_temporary(tmp_path):
    path = tmp_path / "config.yaml"
    write_text_atomic(path, "a: 1\n")
    write_text_atomic(path, "a: 2\n")
    assert path.read_text() == "a: 2\n" and sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]


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
