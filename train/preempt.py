"""Graceful stops: SIGUSR1 / SIGTERM (preemption), SIGINT (Ctrl-C) and the loss of the launcher ask the run
to stop after the current step.

SLURM sends `--signal=B:USR1@N` to the batch shell, whose trap forwards USR1 to the training processes
(launch/slurm/*.sbatch). The ranks agree every step (an all-reduce of one flag) so they all stop at
the same step, write a mid-epoch checkpoint and exit (0 after a preemption signal, 130 after Ctrl-C);
the batch script then requeues the job. A second Ctrl-C aborts at once.

Ranks started by a launcher (`accelerate launch`, torchrun) watch it: when it dies (kill -9 of its process
group, a signal it does not handle) they stop as if preempted, and leave on their own after
`ORPHAN_DEADLINE_S` seconds if the other ranks are gone too, so no orphan keeps writing into the run folder.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time

SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
ORPHAN_DEADLINE_S = 20.0
logger = logging.getLogger(__name__)


class StopFlag:
    """Set by a signal handler (or the launcher watchdog) on any rank; the training loop's per-step all-reduce
    (`train.loop.step_flags`) makes every rank stop at the same step once any rank saw it."""

    def __init__(self):
        self.requested = False
        self.signal_name = ""

    def install(self, watch_launcher: bool | None = None) -> "StopFlag":
        for sig in SIGNALS:
            signal.signal(sig, self._handle)
        if watch_launcher if watch_launcher is not None else launched_by_launcher():
            watch_parent(self)
        return self

    def request(self, reason: str) -> None:
        self.requested, self.signal_name = True, self.signal_name or reason

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if signum == signal.SIGINT:
            if self.requested:
                raise KeyboardInterrupt
            print("Ctrl-C: checkpointing after this step (Ctrl-C again to abort)", file=sys.stderr, flush=True)
        self.request(name)

    @property
    def exit_code(self) -> int:
        """130 after Ctrl-C (the shell's convention), else 0: a preempted job is requeued, not failed."""
        return 130 if self.signal_name == "SIGINT" else 0


def launched_by_launcher() -> bool:
    """True in a process started by `accelerate launch` or torchrun (they set these variables)."""
    return any(k in os.environ for k in ("TORCHELASTIC_RUN_ID", "ACCELERATE_DYNAMO_BACKEND"))


def watch_parent(stop: StopFlag, period: float = 1.0, deadline: float = ORPHAN_DEADLINE_S) -> threading.Thread:
    """A daemon thread: when this process's parent changes (the launcher died), request a stop; if the process
    is still alive `deadline` seconds later (the other ranks are gone and a collective never returns), exit."""
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(period)
        logger.warning("the launcher (pid %d) is gone: checkpointing and stopping", parent)
        print(f"rank {os.environ.get('RANK', '0')}: the launcher (pid {parent}) is gone; stopping", file=sys.stderr,
              flush=True)
        stop.request("the loss of the launcher")
        time.sleep(deadline)
        print(f"rank {os.environ.get('RANK', '0')}: no clean stop within {deadline:.0f} s; exiting (the last "
              "checkpoint is kept)", file=sys.stderr, flush=True)
        os._exit(1)

    thread = threading.Thread(target=watch, name="launcher-watchdog", daemon=True)
    thread.start()
    return thread
