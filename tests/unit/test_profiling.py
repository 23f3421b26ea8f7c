"""`profile.steps=[a,b]`: a Chrome trace of exactly those steps, on rank 0 unless profile.all_ranks."""
from __future__ import annotations

import json

import torch

from axon.config import Profile
from axon.profiling import StepProfiler


def _steps(prof: StepProfiler, n: int) -> None:
    for step in range(1, n + 1):
        prof.before(step)
        with torch.profiler.record_function(f"step{step}"):
            torch.ones(4, 4) @ torch.ones(4, 4)
        prof.after(step)
    prof.close()


def test_trace_holds_the_requested_steps_only(tmp_path):
    prof = StepProfiler(Profile(steps=[2, 3]), tmp_path, rank=0)
    _steps(prof, 4)
    assert prof.path == tmp_path / "profile" / "trace_rank0_steps2-3.json"
    names = {e.get("name") for e in json.loads(prof.path.read_text())["traceEvents"]}
    assert {"step2", "step3"} <= names and not names & {"step1", "step4"}


def test_other_ranks_trace_only_with_all_ranks(tmp_path):
    _steps(StepProfiler(Profile(steps=[1, 1]), tmp_path, rank=1), 2)
    assert not (tmp_path / "profile").exists()
    prof = StepProfiler(Profile(steps=[1, 1], all_ranks=True, dir=str(tmp_path / "t")), tmp_path, rank=1)
    _steps(prof, 2)
    assert prof.path == tmp_path / "t" / "trace_rank1_steps1-1.json" and prof.path.is_file()


def test_no_steps_no_trace(tmp_path):
    _steps(StepProfiler(Profile(), tmp_path, rank=0), 2)
    assert not (tmp_path / "profile").exists()
