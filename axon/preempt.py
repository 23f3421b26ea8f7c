"""Stop signals for the trainer: preemption, the time limit, a user's Ctrl-C or kill.

SIGTERM (Slurm preemption, `scancel`, the local launcher passing one on), SIGINT (Ctrl-C) and
SIGUSR1 (Slurm's warning `slurm.signal_s` seconds before the time limit, `#SBATCH --signal`) all
mean "stop": the handler only records the signal; at each step boundary all ranks agree on it
(each rank's `vote()` summed over the ranks and read by `settle`: `requested()` does it in one
all-reduce of its own, the trainer inside its step's one agreement all-reduce), the trainer
writes a checkpoint there, calls `requeue(os.environ)` (rank 0 of a Slurm job) and exits with `exit_code()`, 128 +
the signal number (143 TERM, 130 INT, 138 USR1), so a scheduler or script sees the job did not
finish; it exits 0 only when training had completed anyway. The requeued or resubmitted job
resumes from that checkpoint (`checkpoint.resume=auto`), so no step is lost or repeated.

    handler = PreemptionHandler.install()
    for step in ...:
        train_step()
        if handler.requested():
            save_checkpoint(step)
            handler.requeue(os.environ)
            return handler.exit_code()
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
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)


class PreemptionHandler:
    """Holds the flag set by the preemption signals; see the module docstring for the protocol."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None  # the last signal this rank received, None if none
        self.agreed: Optional[int] = None  # the signal all ranks stop for (the largest number received)
        self.signals: tuple[int, ...] = STOP_SIGNALS  # what a vote counts: the signals install() caught
        self._previous: dict[int, Any] = {}  # the handlers install() replaced

    @classmethod
    def install(cls, signals: tuple[int, ...] = STOP_SIGNALS) -> "PreemptionHandler":
        """Install the handler for `signals` (main thread only, as Python requires)."""
        handler = cls()
        handler.signals = tuple(signals)
        handler._previous = {sig: signal.signal(sig, handler._on_signal) for sig in signals}
        return handler

    def restore(self) -> None:
        """Put back the handlers `install` replaced."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}

    def _on_signal(self, signum: int, frame: Optional[FrameType]) -> None:
        self.signum = signum  # nothing else: the trainer acts at the next step boundary

    def vote(self) -> list[float]:
        """This rank's stop signal as one count per caught signal (`signals`, the same on every
        rank); summed over the ranks, the counts go to `settle`."""
        return [1.0 if self.signum == s else 0.0 for s in self.signals]

    def settle(self, counts: list[float]) -> bool:
        """Take the ranks' summed `vote()`s: the agreed signal is the largest number any rank
        received; whether there is one."""
        received = [int(s) for s, n in zip(self.signals, counts) if n > 0]
        self.agreed = max(received) if received else None
        return self.agreed is not None

    def requested(self, group: Any = None) -> bool:
        """Whether any rank of `group` (default: the whole job) received a stop signal; every
        rank then knows which (`agreed`, for `exit_code`).

        A collective: every rank of the group must call it at the same step boundary."""
        counts = self.vote()
        if dist.is_available() and dist.is_initialized():
            device = torch.device("cpu")
            if dist.get_backend(group) == "nccl":
                device = torch.device("cuda", torch.cuda.current_device())
            summed = torch.tensor(counts, dtype=torch.float32, device=device)  # [signals]
            dist.all_reduce(summed, group=group)
            counts = summed.tolist()
        return self.settle(counts)

    def exit_code(self) -> int:
        """128 + the agreed stop signal (143 TERM, 130 INT, 138 USR1); 0 when none was agreed."""
        return 128 + self.agreed if self.agreed else 0

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
