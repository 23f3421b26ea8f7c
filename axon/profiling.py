"""`profile.steps=[a,b]`: a torch.profiler trace of training steps a..b (numbered as in
metrics.jsonl), written in Chrome trace format (chrome://tracing, Perfetto) to
`<profile.dir or run dir/profile>/trace_rank<N>_steps<a>-<b>.json`, on rank 0 or, with
`profile.all_ranks=true`, on every rank.

    prof = StepProfiler(cfg.profile, cfg.run_dir, rank)
    prof.before(step); ...one step...; prof.after(step); ... prof.close()
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
import torch.profiler as tp

from axon.config import Profile


class StepProfiler:
    def __init__(self, profile: Profile, run_dir: Path, rank: int):
        on = bool(profile.steps) and (rank == 0 or profile.all_ranks)
        self.first, self.last = (profile.steps[0], profile.steps[-1]) if on else (0, -1)
        self.dir = Path(profile.dir) if profile.dir else run_dir / "profile"
        self.rank = rank
        self._prof: Optional[Any] = None
        self.path: Optional[Path] = None

    def before(self, step: int) -> None:
        """Called before step `step` (1-based) runs."""
        if self._prof is None and self.path is None and self.first <= step <= self.last:
            activities = [tp.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(tp.ProfilerActivity.CUDA)
            self._prof = tp.profile(activities=activities, record_shapes=True)
            self._prof.__enter__()

    def after(self, step: int) -> None:
        """Called after step `step` ran; the trace is written after the last requested step."""
        if self._prof is not None and step >= self.last:
            self.close()

    def close(self) -> None:
        """Stop and write the trace (also when the run ends before the last requested step)."""
        if self._prof is None:
            return
        prof, self._prof = self._prof, None
        prof.__exit__(None, None, None)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / f"trace_rank{self.rank}_steps{self.first}-{self.last}.json"
        prof.export_chrome_trace(str(self.path))
