"""Stopping a run cleanly on SIGTERM (SLURM preemption, ``kill``), SIGINT (Ctrl-C) and SIGUSR1.

The handler only sets a flag. The training loop looks at it after every optimizer step (a Python
attribute, no device sync); under DDP the ranks agree on it at the log rows (every ``trainer.log_every``
steps, where they synchronise anyway), so that all stop after the same step. The run then finishes that
step, writes a mid-epoch checkpoint, prints where it stands and the command that resumes it, and exits
with ``128 + signal`` (130 for SIGINT, 143 for SIGTERM). A second Ctrl-C stops at once.

Inside a SLURM job (``SLURM_JOB_ID`` set), SIGUSR1 also requeues the job (``scontrol requeue``), the
usual way to outlive a time limit (``#SBATCH --signal=USR1@120``); a requeued job (``SLURM_RESTART_COUNT``
> 0) resumes from its checkpoint by itself (``resume=auto``).
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
from types import FrameType
from typing import Any

log = logging.getLogger("kdrun")

SIGNALS = tuple(s for s in (getattr(signal, n, None) for n in ("SIGTERM", "SIGINT", "SIGUSR1")) if s is not None)


class RunInterrupted(Exception):
    """Raised by the engine after a signal, once the checkpoint is written."""

    def __init__(self, signum: int, where: str, checkpoint: str | None) -> None:
        self.signum, self.where, self.checkpoint = signum, where, checkpoint
        super().__init__(f"stopped by {signal.Signals(signum).name} {where}")

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum)


class InterruptFlag:
    """Catches :data:`SIGNALS` while installed (main thread only) and remembers the first."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def pending(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without a checkpoint
        if self.signum is None:
            self.signum = signum
            log.warning("received %s: finishing the current step, then writing a checkpoint (Ctrl-C again stops at once)",
                        signal.Signals(signum).name)

    def install(self) -> InterruptFlag:
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()


def requeue_slurm_job(signum: int) -> bool:
    """``scontrol requeue $SLURM_JOB_ID`` after SIGUSR1 inside a SLURM job; whether it was requeued."""
    job = os.environ.get("SLURM_JOB_ID")
    if job is None or signum != getattr(signal, "SIGUSR1", None):
        return False
    try:
        subprocess.run(["scontrol", "requeue", job], check=True, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as ex:
        log.warning("could not requeue SLURM job %s: %s", job, ex)
        return False
    log.warning("requeued SLURM job %s: it resumes from its checkpoint when it starts again", job)
    return True


def requeued_slurm_job() -> bool:
    """Whether this process is a SLURM job that was requeued (it then resumes by itself)."""
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0
