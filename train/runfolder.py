"""The run folder as one job's property: an exclusive lock held for the whole run, a refusal to start a new
run over an old one, and the recognition of a run that already finished."""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from data.atomic import remove_stale_temporaries

from .config import UserError

LOCK_NAME = ".lock"
RUN_MARKERS = ("config.yaml", "last.pt", "summary.csv", "checkpoints")  # what makes a folder a run folder


def holder_description() -> dict:
    """Who holds a lock: host, pid, SLURM job (when there is one) and the time it was taken."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job": os.environ.get("SLURM_JOB_ID", ""),
            "since": time.strftime("%Y-%m-%d %H:%M:%S")}


def describe_holder(text: str) -> str:
    try:
        h = json.loads(text)
        return (f"pid {h['pid']} on {h['host']}" + (f" (SLURM job {h['slurm_job']})" if h.get("slurm_job") else "")
                + f" since {h['since']}")
    except (ValueError, KeyError, TypeError):
        return "another process"


class RunLock:
    """`flock` on RUN/.lock (released by the kernel when the process dies, however it dies). The file names its
    holder so a second job can say who has the folder."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_NAME
        self.fd = None

    def acquire(self) -> str:
        """Take the lock; returns "" on success, else a description of the holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace")
            os.close(fd)
            return describe_holder(holder)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder_description()).encode(), 0)
        self.fd = fd
        return ""

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def claim_run_dir(run_dir: Path, resume: bool) -> RunLock:
    """Lock the run folder for this job (main process). A folder held by another job, or a new run started
    into a folder that already holds one, is a UserError naming what to do."""
    run_dir = Path(run_dir)
    if not resume and run_dir.is_dir() and any((run_dir / m).exists() for m in RUN_MARKERS):
        raise UserError(f"{run_dir} already holds a run; continue it with --resume {run_dir}, or choose another "
                        "--run_name / --output")
    lock = RunLock(run_dir)
    try:
        holder = lock.acquire()
    except OSError as e:
        raise UserError(f"cannot create the run folder {run_dir} ({e.strerror or e}); choose a writable --output")
    if holder:
        raise UserError(f"{run_dir} is in use by {holder}; wait for that job to end (or stop it) - two jobs "
                        "must never write one run folder")
    remove_stale_temporaries(run_dir)
    remove_stale_temporaries(run_dir / "checkpoints")
    return lock


def finished_summary(run_dir: Path, epochs: int, checkpoint_epoch: int) -> dict | None:
    """The saved final summary when the run already trained all `epochs` (a resubmitted finished job), else None."""
    path = Path(run_dir) / "final.json"
    if checkpoint_epoch < epochs or not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        return None
