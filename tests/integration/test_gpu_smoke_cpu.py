"""`benchmarks/gpu_smoke.py --cpu --shared-process`: every check runs on CPU (gloo, small sizes), all
in one child process (a process start each would cost ~4 s of CPU apiece), and passes; the results
file has one JSON line per check and the summary table one row each."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHECKS = {"versions", "nccl_init", "sdpa_flash", "ring_attention", "activation_offload", "optimizer_offload",
          "checkpoint_resume", "llama_step", "fake_zero3_dp8", "fake_pp4_1f1b", "gemm_tuning",
          "triton_kernels"}

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


def test_gpu_smoke_cpu_mode_passes(tmp_path: Path) -> None:
    out = tmp_path / "smoke.jsonl"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_smoke.py"), "--cpu", "--shared-process",
                           "--out", str(out)],
                          cwd=tmp_path, capture_output=True, text=True)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    failed = {r["check"]: r.get("reason") for r in records if r["status"] not in ("pass", "skip")}
    assert done.returncode == 0 and not failed, (failed, done.stderr[-3000:])
    assert {r["check"] for r in records} == CHECKS and len(records) == len(CHECKS)
    assert all(r["mode"] == "cpu" for r in records)
    assert all(r.get("reason") for r in records if r["status"] == "skip")  # a skip says why
    rows = done.stdout.splitlines()
    assert rows[0].split()[:3] == ["check", "status", "s"] and len(rows) == len(CHECKS) + 1


def test_unknown_check_is_named(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_smoke.py"), "--cpu", "--only", "bogus"],
                          cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 2 and "--only: unknown check(s) ['bogus']" in done.stderr
