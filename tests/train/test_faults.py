"""Fault injection on real digits runs: kills at every run-folder write, a full disk, damaged checkpoints,
a second job on one folder, a lost launcher, Ctrl-C, a resubmitted finished run, divergence, preemption in
the cross-validation stage. Each case ends in a clean resume or one `error:` line; nothing is lost."""
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, accelerate_cmd, cpu_env

from train.checkpoint import DamagedCheckpoint, load_checkpoint, load_resume_checkpoint, save_checkpoint
from train.runfolder import claim_run_dir
from train.config import UserError

FAST = ["--progress", "false", "--warmup_epochs", "1", "--correction_epoch", "2", "--batch_size", "64",
        "--cache_images", "true"]


def main_cmd(tmp_path, *args):
    return [sys.executable, str(REPO / "train" / "main.py"), "--output", str(tmp_path / "runs"), *FAST, *map(str, args)]


def run(tmp_path, *args, env=None, timeout=300):
    return subprocess.run(main_cmd(tmp_path, *args), capture_output=True, text=True, timeout=timeout, cwd=tmp_path,
                          env={**cpu_env(), **(env or {})})


def rows(run_dir: Path) -> list[int]:
    return [int(r["epoch"]) for r in csv.DictReader((run_dir / "summary.csv").open())]


def error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def test_damaged_last_checkpoint_falls_back_to_the_newest_good_epoch_file(tmp_path, caplog):
    folder = tmp_path / "run"
    for epoch in range(3):
        state = {"model": {"w": torch.full((64,), float(epoch))}, "epoch": epoch + 1, "config": {}}
        save_checkpoint(folder, state, epoch, keep=3, is_best=False)
    last = folder / "last.pt"
    data = bytearray(last.read_bytes())
    at = data.find(bytes(torch.full((64,), 2.0).numpy().tobytes()[:8]))
    data[at:at + 64] = bytes(64)  # 64 flipped bytes inside the tensor data: still unpickles
    os.unlink(last)  # a hard link to epoch-0002.pt: damage a copy, not both
    last.write_bytes(bytes(data))
    with pytest.raises(DamagedCheckpoint, match="do not match the checksum"):
        load_checkpoint(last)
    path, state = load_resume_checkpoint(folder)
    assert path.name == "epoch-0002.pt" and state["epoch"] == 3  # the epoch file is intact
    (folder / "checkpoints" / "epoch-0002.pt").write_bytes(bytes(data[: len(data) // 2]))  # truncated
    path, state = load_resume_checkpoint(folder)
    assert path.name == "epoch-0001.pt" and state["epoch"] == 2
    assert "skipping a damaged checkpoint" in caplog.text


def test_run_folder_lock_names_its_holder_and_a_new_run_never_reuses_a_folder(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]); "
                               "from train.runfolder import RunLock; assert RunLock(sys.argv[2]).acquire() == ''; "
                               "print('locked', flush=True); time.sleep(60)", str(REPO), str(tmp_path / "run")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=rf"is in use by pid {holder.pid} on .* since"):
            claim_run_dir(tmp_path / "run", resume=True)
    finally:
        holder.kill()
        holder.wait()
    lock = claim_run_dir(tmp_path / "run", resume=True)  # the kernel released the dead holder's lock
    lock.release()
    (tmp_path / "run" / "config.yaml").write_text("method: ce\n")
    with pytest.raises(UserError, match="already holds a run; continue it with --resume"):
        claim_run_dir(tmp_path / "run", resume=False)


@pytest.mark.parametrize("file,count", [("summary.csv", 2), ("config.yaml", 1), ("epoch-0001.pt", 1),
                                        ("final.json", 1)])
def test_kill_at_a_run_folder_write_loses_nothing(tmp_path, digits_shards, file, count):
    """SIGKILL after the temporary file is written, before the rename; then the job is resubmitted."""
    args = ["--data", digits_shards, "--run_name", "r", "--epochs", "3", "--method", "ce"]
    killed = run(tmp_path, *args, env={"NOISYMIX_FAULT": f"{file}:{count}"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    folder = tmp_path / "runs" / "r"
    if (folder / "summary.csv").exists():
        assert rows(folder) == list(range(len(rows(folder))))  # never a torn or emptied file
    resumed = run(tmp_path, "--resume", folder) if (folder / "config.yaml").exists() else run(tmp_path, *args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert rows(folder) == [0, 1, 2] and json.loads((folder / "final.json").read_text())["last"]["test_top1"] > 0
    assert not list(folder.glob(".*.tmp-*")) and not list((folder / "checkpoints").glob(".*.tmp-*"))


def test_resubmitted_finished_run_is_a_no_op_and_garbage_config_yaml_is_not_read(tmp_path, digits_shards):
    args = ["--data", digits_shards, "--run_name", "r", "--epochs", "2", "--method", "ce", "--lr", "0.02"]
    assert run(tmp_path, *args).returncode == 0
    folder = tmp_path / "runs" / "r"
    final = (folder / "final.json").read_bytes()
    again = run(tmp_path, "--resume", folder)
    assert again.returncode == 0 and "already finished" in again.stdout
    assert (folder / "final.json").read_bytes() == final and rows(folder) == [0, 1]
    (folder / "config.yaml").write_text("method: mixnn\nlr: 0.05\nepochs: 60\n")  # a damaged copy for people
    longer = run(tmp_path, "--resume", folder, "--epochs", "3")
    assert longer.returncode == 0, longer.stderr[-3000:]
    saved = load_checkpoint(folder / "last.pt")["config"]
    assert (saved["method"], saved["lr"], saved["epochs"]) == ("ce", 0.02, 3) and rows(folder) == [0, 1, 2]


def test_second_job_on_a_running_folder_fails_at_once(tmp_path, digits_shards):
    first = subprocess.Popen(main_cmd(tmp_path, "--data", digits_shards, "--run_name", "r", "--epochs", "40"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=cpu_env())
    folder = tmp_path / "runs" / "r"
    try:
        deadline = time.time() + 120
        while not (folder / "summary.csv").exists() and time.time() < deadline:
            time.sleep(0.2)
        started = time.time()
        second = run(tmp_path, "--resume", folder)
        assert second.returncode == 2 and "Traceback" not in second.stderr
        assert error_lines(second) == [next(line for line in second.stderr.splitlines() if "is in use by" in line)]
        assert f"pid {first.pid}" in second.stderr and time.time() - started < 60
        new = run(tmp_path, "--data", digits_shards, "--run_name", "r")
        assert new.returncode == 2 and "already holds a run" in new.stderr
    finally:
        first.kill()
        first.communicate()


def test_ctrl_c_checkpoints_mid_epoch_and_exits_130(tmp_path, digits_shards):
    proc = subprocess.Popen(main_cmd(tmp_path, "--data", digits_shards, "--run_name", "r", "--epochs", "40",
                                     "--batch_size", "16"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=cpu_env())
    folder = tmp_path / "runs" / "r"
    deadline = time.time() + 120
    while not (folder / "summary.csv").exists() and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "preempted by SIGINT" in out and "Traceback" not in err
    state = load_checkpoint(folder / "last.pt")
    assert state["step"] >= 1 and state["partial_metrics"]["epoch"] == state["epoch"]


def test_non_finite_loss_stops_with_one_line_and_no_nan_checkpoint(tmp_path, digits_shards):
    result = run(tmp_path, "--data", digits_shards, "--run_name", "r", "--epochs", "6", "--method", "ce", "--lr", "1e6")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(error_lines(result)) == 1 and "training diverged: non-finite values at epoch" in error_lines(result)[0]
    for path in (tmp_path / "runs" / "r" / "checkpoints").glob("epoch-*.pt"):
        assert all(torch.isfinite(v).all() for v in load_checkpoint(path)["model"].values() if v.is_floating_point())


def running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie stays until a reaper collects it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def test_ranks_that_lose_their_launcher_stop_within_seconds(tmp_path, digits_shards):
    from test_preempt import wait_for_ranks

    cmd = accelerate_cmd("train/main.py", "--output", tmp_path / "runs", *FAST, "--data", digits_shards,
                         "--run_name", "r", "--epochs", "200")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            env=cpu_env())
    folder = tmp_path / "runs" / "r"
    deadline = time.time() + 180
    while not (folder / "summary.csv").exists() and time.time() < deadline:
        time.sleep(0.2)
    ranks = wait_for_ranks(proc.pid, 2)
    assert len(ranks) == 2
    proc.kill()  # SIGKILL of the launcher alone: its ranks are in a session of their own
    proc.communicate()
    gone_by = time.time() + 40
    while time.time() < gone_by and any(running(p) for p in ranks):
        time.sleep(0.5)
    alive = [p for p in ranks if running(p)]
    for p in alive:
        os.kill(p, signal.SIGKILL)
    assert not alive, "ranks kept training after their launcher died"
    assert load_resume_checkpoint(folder) is not None  # the folder resumes


def test_preemption_in_the_cross_validation_stage_stops_within_a_step_and_resumes_exactly(tmp_path, digits_shards):
    args = ["--data", digits_shards, "--method", "selectmix", "--epochs", "3", "--cv_folds", "2", "--cv_epochs", "4",
            "--eval_every", "3", "--batch_size", "16"]
    assert run(tmp_path, *args, "--run_name", "ref").returncode == 0
    proc = subprocess.Popen(main_cmd(tmp_path, *args, "--run_name", "pre"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=cpu_env())
    time.sleep(1)
    folder = tmp_path / "runs" / "pre"
    deadline = time.time() + 120
    while not (folder / "config.yaml").exists() and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(3)  # inside the first fold's training
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "cross-validation stage at fold" in out, err[-2000:]
    assert list((folder / "selectmix").glob("fold-*.partial.pt"))
    resumed = subprocess.run([sys.executable, str(REPO / "train" / "main.py"), "--resume", str(folder)],  # its settings
                             capture_output=True, text=True, timeout=300, cwd=tmp_path, env=cpu_env())
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ref = load_checkpoint(tmp_path / "runs" / "ref" / "last.pt")["model"]
    got = load_checkpoint(folder / "last.pt")["model"]
    assert all(torch.equal(ref[k], got[k]) for k in ref)


def tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_full_disk_is_one_error_line_and_keeps_every_written_row(tmp_path, digits_shards):
    disk = tmp_path / "disk"
    if not tmpfs(disk, "1200k"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        result = subprocess.run([sys.executable, str(REPO / "train" / "main.py"), "--output", str(disk), *FAST,
                                 "--data", str(digits_shards), "--run_name", "r", "--epochs", "30", "--method", "ce",
                                 "--keep_checkpoints", "3"],
                                capture_output=True, text=True, timeout=300, cwd=tmp_path, env=cpu_env())
        assert result.returncode == 2, result.stderr[-2000:]
        assert "Traceback" not in result.stderr and len(error_lines(result)) == 1
        assert "No space left on device" in error_lines(result)[0] and "previous content is intact" in result.stderr
        folder = disk / "r"
        done = load_resume_checkpoint(folder)[1]["epoch"]
        assert done >= 1 and rows(folder)[: done] == list(range(done))
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)
