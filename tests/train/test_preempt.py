"""SIGUSR1 mid-run on 2 ranks: both stop at the same step, checkpoint, and the resumed run ends with
the weights of an uninterrupted run."""
import csv
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import accelerate_cmd, cpu_env

EPOCHS = 10  # the signal goes out after epoch 0: the other epochs (~0.5 s each) are the margin
ARGS = ["--epochs", str(EPOCHS), "--warmup_epochs", "1", "--correction_epoch", "2", "--progress", "false",
        "--eval_every", str(EPOCHS), "--batch_size", "32"]


def launch_cmd(tmp, *args):
    return accelerate_cmd("train/main.py", "--output", tmp / "runs", *args)


def rank_pids(parent: int) -> list[int]:
    """The training processes under the launcher (its descendants running train/main.py).

    Read from /proc, not `ps`: ps truncates the command line to $COLUMNS (80 on some CI hosts), which
    can cut "train/main.py" off a long checkout path.
    """
    procs = {}
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if entry.name.isdigit():
            procs[int(entry.name)] = (int(stat.rsplit(")", 1)[1].split()[1]), [a.decode() for a in cmdline])
    children, frontier = set(), {parent}
    while frontier:
        frontier = {p for p, (pp, _) in procs.items() if pp in frontier} - children
        children |= frontier
    return sorted(p for p in children
                  if any(a.endswith("train/main.py") for a in procs[p][1])
                  and not any("accelerate" in a for a in procs[p][1]))


def wait_for_ranks(parent: int, n: int, timeout: float = 60) -> list[int]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        pids = rank_pids(parent)
        if len(pids) == n:
            return pids
        time.sleep(0.1)
    return rank_pids(parent)


@pytest.mark.parametrize("method", ["mixnn", "dividemix"])
def test_signal_stops_mid_epoch_and_resume_matches(tmp_path, digits_shards, method):
    args = [*ARGS, "--method", method]
    reference = subprocess.run(launch_cmd(tmp_path, "--data", digits_shards, "--run_name", "ref", *args),
                               capture_output=True, text=True, timeout=600, env=cpu_env(), cwd=tmp_path)
    assert reference.returncode == 0, reference.stderr[-3000:]
    run = tmp_path / "runs" / "pre"
    proc = subprocess.Popen(launch_cmd(tmp_path, "--data", digits_shards, "--run_name", "pre", *args),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cpu_env(), cwd=tmp_path)
    deadline = time.time() + 300
    while time.time() < deadline and not (run / "summary.csv").is_file():
        time.sleep(0.2)
    pids = wait_for_ranks(proc.pid, 2)
    assert len(pids) == 2, (pids, proc.poll())
    os.kill(pids[1], signal.SIGUSR1)  # one rank only: the ranks must agree to stop together
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "preempted by" in out
    state = torch.load(run / "last.pt", weights_only=True)
    stopped_epoch = state["epoch"]
    assert stopped_epoch < EPOCHS and state["step"] >= 1  # a mid-epoch checkpoint
    resumed = subprocess.run(launch_cmd(tmp_path, "--resume", run), capture_output=True, text=True, timeout=600,
                             env=cpu_env(), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    final = torch.load(run / "last.pt", weights_only=True)
    expected = torch.load(tmp_path / "runs" / "ref" / "last.pt", weights_only=True)
    assert final["epoch"] == EPOCHS and final["step"] == 0
    for key, value in expected["model"].items():
        assert torch.equal(value, final["model"][key]), key
    rows = list(csv.DictReader((run / "summary.csv").open()))
    assert [int(r["epoch"]) for r in rows] == list(range(EPOCHS))
    if method == "mixnn" and stopped_epoch >= 1:  # the refresh ran before the signal: its scalars are in the row
        assert rows[stopped_epoch]["time_refresh"] and rows[stopped_epoch]["clean_fraction"]
