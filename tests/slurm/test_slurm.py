"""The SLURM batch scripts on a real SLURM (slurmctld + 2 emulated slurmd nodes on this machine).

Skipped where `sbatch` is absent; CI installs Debian's slurm-wlm + munge first
(`bash tests/slurm/slurm_ci.sh install`). The daemons this module starts are stopped by PID.
"""
import csv
import json
import os
import re
import shutil
import subprocess
import time

import pytest
import torch
from conftest import REPO

HARNESS = REPO / "tests" / "slurm" / "slurm_ci.sh"
pytestmark = pytest.mark.skipif(shutil.which("sbatch") is None or shutil.which("slurmctld") is None,
                                reason="SLURM not installed (run: bash tests/slurm/slurm_ci.sh install)")
TRAIN = ["--warmup_epochs", "1", "--correction_epoch", "2", "--progress", "false", "--batch_size", "32"]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A running 2-node SLURM; yields the environment clients and jobs need."""
    state = tmp_path_factory.mktemp("slurm")
    short = f"/tmp/slurm-ci-{os.getpid()}"  # unix socket paths must stay short
    env = {**os.environ, "SLURM_CI_DIR": short, "SLURM_CI_NODES": "2", "SLURM_CONF": f"{short}/etc/slurm.conf"}
    started = subprocess.run(["bash", str(HARNESS), "start"], env=env, capture_output=True, text=True, timeout=120)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        yield {**env, "NOISYMIX_REPO": str(REPO), "ACCELERATE_CONFIG": str(REPO / "launch/accelerate/cpu2.yaml"),
               "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "STATE": str(state)}
    finally:
        subprocess.run(["bash", str(HARNESS), "stop"], env=env, capture_output=True, timeout=60)
        shutil.rmtree(short, ignore_errors=True)


def sbatch(env, script, run_dir, *args, options=()):
    out = subprocess.run(["sbatch", "--parsable", f"--output={run_dir}.out", *options, str(REPO / script),
                          str(run_dir), *map(str, args)], env=env, capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().split(";")[0]


def job_state(env, job):
    out = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True).stdout
    match = re.search(r"JobState=(\w+)", out)
    return match.group(1) if match else "GONE"


def wait_for(env, job, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "GONE"), timeout=400):
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = job_state(env, job)
        if state in states:
            return state
        time.sleep(1)
    raise AssertionError(f"job {job} still {job_state(env, job)} after {timeout} s")


def job_log(run_dir):
    return "".join(p.read_text() for p in sorted(run_dir.glob("slurm-*.log")))


def test_single_node_job_trains_to_completion(slurm, digits_shards, tmp_path):
    run = tmp_path / "single"
    job = sbatch({**slurm, "PROCS_PER_NODE": "2"}, "launch/slurm/train.sbatch", run, "--data", digits_shards,
                 "--epochs", "3", *TRAIN)
    assert wait_for(slurm, job) == "COMPLETED", job_log(run)
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 3
    assert list((run / "tb").glob("events.out.tfevents.*"))
    final = json.loads((run / "final.json").read_text())
    assert final["world_size"] == 2 and f"job {job}" in job_log(run)


def test_multinode_job_uses_both_nodes(slurm, digits_shards, tmp_path):
    run = tmp_path / "multi"
    job = sbatch({**slurm, "PROCS_PER_NODE": "1"}, "launch/slurm/train_multinode.sbatch", run, "--data",
                 digits_shards, "--epochs", "2", *TRAIN, options=["--nodes=2"])
    assert wait_for(slurm, job) == "COMPLETED", job_log(run)
    log = job_log(run)
    assert "node 0 of 2" in log and "node 1 of 2" in log
    rows = list(csv.DictReader((run / "summary.csv").open()))
    assert rows[-1]["tables_checked_ranks"] == "2"  # one rank per node, both in one process group
    assert json.loads((run / "final.json").read_text())["world_size"] == 2


PREEMPT_EPOCHS = 12  # the signal goes out after epoch 0; the other epochs (~0.5 s each) are the margin


def test_preempted_job_checkpoints_requeues_and_finishes(slurm, digits_shards, tmp_path):
    run = tmp_path / "preempt"
    job = sbatch({**slurm, "PROCS_PER_NODE": "2"}, "launch/slurm/train.sbatch", run, "--data", digits_shards,
                 "--epochs", str(PREEMPT_EPOCHS), *TRAIN)
    deadline = time.time() + 300
    while not (run / "summary.csv").is_file():
        assert time.time() < deadline and job_state(slurm, job) in ("PENDING", "RUNNING"), job_log(run)
        time.sleep(0.5)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=slurm, check=True)
    assert wait_for(slurm, job, timeout=500) == "COMPLETED", job_log(run)
    log = job_log(run)
    assert "checkpoint and requeue" in log and "preempted by SIGUSR1" in log and "requeueing job" in log
    assert "resuming from" in log and "(restart 1)" in log
    state = torch.load(run / "last.pt", weights_only=True)
    assert state["epoch"] == PREEMPT_EPOCHS and state["step"] == 0
    rows = list(csv.DictReader((run / "summary.csv").open()))
    assert [int(r["epoch"]) for r in rows] == list(range(PREEMPT_EPOCHS))
