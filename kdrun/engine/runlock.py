"""One run per run directory: a lock file that refuses a second run started in the same folder.

Two runs writing one directory interleave their ``metrics.jsonl`` rows and overwrite each other's
checkpoints. :class:`RunLock` creates ``<run_dir>/.kdrun.lock`` exclusively (``O_EXCL``), holding the
owner's host, process id and start time; a lock whose process no longer exists on this host is stale
and taken over (a killed run leaves its lock behind). The lock is released when the run ends, however
it ends, short of SIGKILL.
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from kdrun.errors import KdrunError

LOCK_NAME = ".kdrun.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def lock_owner(run_dir: Path) -> dict[str, Any] | None:
    """The live owner of ``run_dir``'s lock (host, pid, started), or None when it is free or stale."""
    path = Path(run_dir) / LOCK_NAME
    try:
        owner = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(owner, dict):
        return None
    if owner.get("host") == socket.gethostname() and not _alive(int(owner.get("pid", -1))):
        return None  # stale: its process is gone
    if owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
        return None  # this process (a second Trainer in one process reuses its lock)
    return owner


def busy_message(run_dir: Path, owner: dict[str, Any]) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("started", 0)))
    return (f"{run_dir} is in use by another kdrun run (process {owner.get('pid')} on {owner.get('host')}, started "
            f"{started}); two runs in one directory would mix their metrics and overwrite each other's checkpoints. "
            f"Wait for it, choose another hydra.run.dir, or delete {Path(run_dir) / LOCK_NAME} if that run is gone.")


class RunLock:
    """The lock of one run directory (see the module docstring); ``acquire`` raises KdrunError when a
    live process holds it."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.held = False

    def acquire(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = lock_owner(self.run_dir)
                if owner is not None:
                    raise KdrunError(busy_message(self.run_dir, owner)) from None
                self.path.unlink(missing_ok=True)  # stale, or this process's own
                continue
            with os.fdopen(fd, "w") as f:
                json.dump({"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}, f)
            self.held = True
            return
        raise KdrunError(f"cannot lock {self.run_dir}: another run took it at the same moment; choose another hydra.run.dir")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
