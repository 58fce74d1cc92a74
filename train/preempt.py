"""Graceful preemption: SIGUSR1 / SIGTERM ask the run to stop after the current step.

SLURM sends `--signal=B:USR1@N` to the batch shell, whose trap forwards USR1 to the training processes
(launch/slurm/*.sbatch). The ranks agree every step (an all-reduce of one flag) so they all stop at
the same step, write a mid-epoch checkpoint and exit 0; the batch script then requeues the job.
"""
from __future__ import annotations

import signal

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StopFlag:
    """Set by a signal handler on any rank; `agreed()` is True on every rank once any rank saw it."""

    def __init__(self):
        self.requested = False
        self.signal_name = ""

    def install(self) -> "StopFlag":
        for sig in SIGNALS:
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.requested, self.signal_name = True, signal.Signals(signum).name

    def agreed(self) -> bool:
        """Collective: every rank must call it at the same point (once per step)."""
        if not (dist.is_available() and dist.is_initialized()):
            return self.requested
        flag = torch.tensor([1.0 if self.requested else 0.0])
        if dist.get_backend() == "nccl":
            flag = flag.cuda()
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)
