"""Preemption and time-limit handling for the trainer.

Slurm sends SIGUSR1 `slurm.signal_s` seconds before the time limit (`#SBATCH --signal`), and
SIGTERM on preemption or `scancel`. The signal handler only sets a flag; the trainer asks
`requested()` at each step boundary (all ranks agree through one MAX all-reduce), writes a
checkpoint there, calls `requeue(os.environ)` and exits 0. The requeued job resumes from that
checkpoint (`checkpoint.resume=auto`), so no step is lost or repeated.

    handler = PreemptionHandler.install()
    for step in ...:
        train_step()
        if handler.requested():
            save_checkpoint(step)
            handler.requeue(os.environ)
            return 0
"""
from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from types import FrameType
from typing import Any, Mapping, Optional

import torch
import torch.distributed as dist

REQUEUE_TIMEOUT_S = 60.0  # scontrol talks to slurmctld; a stuck controller must not hang the exit


class PreemptionHandler:
    """Holds the flag set by the preemption signals; see the module docstring for the protocol."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None  # the last signal received, None if none

    @classmethod
    def install(cls, signals: tuple[int, ...] = (signal.SIGUSR1, signal.SIGTERM)) -> "PreemptionHandler":
        """Install the handler for `signals` (main thread only, as Python requires)."""
        handler = cls()
        for sig in signals:
            signal.signal(sig, handler._on_signal)
        return handler

    def _on_signal(self, signum: int, frame: Optional[FrameType]) -> None:
        self.signum = signum  # nothing else: the trainer acts at the next step boundary

    def requested(self, group: Any = None) -> bool:
        """Whether any rank of `group` (default: the whole job) received a preemption signal.

        A collective: every rank of the group must call it at the same step boundary."""
        local = self.signum is not None
        if not (dist.is_available() and dist.is_initialized()):
            return local
        device = torch.device("cpu")
        if dist.get_backend(group) == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        flag = torch.tensor([int(local)], dtype=torch.int32, device=device)  # [1]
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        return bool(flag.item())

    def requeue(self, environ: Mapping[str, str]) -> bool:
        """On rank 0 of a Slurm job: `scontrol requeue <job id>`. Returns whether it requeued.

        Slurm then stops every task of the job (SIGTERM, which this handler absorbs) and starts
        the job again once its resources are free; call this after the checkpoint is written."""
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        job_id = environ.get("SLURM_JOB_ID")
        if rank != 0 or not job_id:
            return False
        scontrol = shutil.which("scontrol", path=environ.get("PATH"))
        if scontrol is None:
            print(f"[axon] preempted, but scontrol is not on PATH: job {job_id} is not requeued; "
                  "resubmit it to resume from the checkpoint", file=sys.stderr, flush=True)
            return False
        try:
            done = subprocess.run([scontrol, "requeue", job_id], env=dict(environ), capture_output=True,
                                  text=True, timeout=REQUEUE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            print(f"[axon] `scontrol requeue {job_id}` timed out after {REQUEUE_TIMEOUT_S:.0f}s; "
                  "resubmit the job to resume from the checkpoint", file=sys.stderr, flush=True)
            return False
        if done.returncode != 0:
            print(f"[axon] `scontrol requeue {job_id}` failed ({done.stderr.strip()}); the job was submitted "
                  "with slurm.requeue=false or Slurm refused: resubmit it to resume from the checkpoint",
                  file=sys.stderr, flush=True)
            return False
        print(f"[axon] checkpoint written, job {job_id} requeued", file=sys.stderr, flush=True)
        return True
