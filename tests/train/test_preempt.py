"""SIGUSR1 mid-run on 2 ranks: both stop at the same step, checkpoint, and the resumed run ends with
the weights of an uninterrupted run."""
import csv
import os
import signal
import subprocess
import sys
import time

import torch
from conftest import REPO

ARGS = ["--epochs", "5", "--warmup_epochs", "1", "--correction_epoch", "2", "--progress", "false",
        "--eval_every", "5", "--batch_size", "32"]


def launch_cmd(tmp, *args):
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(REPO / "launch" / "accelerate" / "cpu2.yaml"), str(REPO / "train" / "main.py"),
            "--output", str(tmp / "runs"), *map(str, args)]


def env():
    return {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}


def rank_pids(parent: int) -> list[int]:
    """The training processes under the launcher (its descendants running train/main.py)."""
    out = subprocess.run(["ps", "-eo", "pid,ppid,args"], capture_output=True, text=True).stdout.splitlines()[1:]
    rows = [line.split(None, 2) for line in out]
    children, frontier = set(), {parent}
    while frontier:
        frontier = {int(p) for p, pp, _ in rows if int(pp) in frontier} - children
        children |= frontier
    return [int(p) for p, _, a in rows if int(p) in children and "train/main.py" in a and "accelerate" not in a]


def test_signal_stops_mid_epoch_and_resume_matches(tmp_path, digits_shards):
    reference = subprocess.run(launch_cmd(tmp_path, "--data", digits_shards, "--run_name", "ref", *ARGS),
                               capture_output=True, text=True, timeout=600, env=env(), cwd=tmp_path)
    assert reference.returncode == 0, reference.stderr[-3000:]
    run = tmp_path / "runs" / "pre"
    proc = subprocess.Popen(launch_cmd(tmp_path, "--data", digits_shards, "--run_name", "pre", *ARGS),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(), cwd=tmp_path)
    deadline = time.time() + 300
    while time.time() < deadline and not (run / "summary.csv").is_file():
        time.sleep(0.2)
    time.sleep(0.5)
    pids = rank_pids(proc.pid)
    assert len(pids) == 2
    os.kill(pids[1], signal.SIGUSR1)  # one rank only: the ranks must agree to stop together
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "preempted by" in out
    state = torch.load(run / "last.pt", weights_only=True)
    stopped_epoch = state["epoch"]
    assert stopped_epoch < 5 and state["step"] >= 1  # a mid-epoch checkpoint
    resumed = subprocess.run(launch_cmd(tmp_path, "--resume", run), capture_output=True, text=True, timeout=600,
                             env=env(), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    final = torch.load(run / "last.pt", weights_only=True)
    expected = torch.load(tmp_path / "runs" / "ref" / "last.pt", weights_only=True)
    assert final["epoch"] == 5 and final["step"] == 0
    for key, value in expected["model"].items():
        assert torch.equal(value, final["model"][key]), key
    rows = list(csv.DictReader((run / "summary.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2, 3, 4]
