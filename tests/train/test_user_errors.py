"""A user's mistake prints one `error: ...` line and exits 2, without a traceback (train/main.py)."""
import subprocess
import sys

import pytest
from conftest import REPO, accelerate_cmd, cpu_env


def run_main(tmp_path, *args):
    cmd = [sys.executable, str(REPO / "train" / "main.py"), "--output", str(tmp_path / "runs"), "--progress", "false",
           *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)


@pytest.mark.parametrize("args,message", [
    (["--lr_rate", "0.1"], "error: command line: unknown key 'lr_rate' (did you mean 'lr' or 'lr_min'"),
    (["--epochs", "many"], "error: --epochs: expected int, got 'many'"),
    (["--method", "dividemix2"], "error: --method must be one of ce, mixup, mixnn"),
    (["--dataset", "cifar10", "--data", "nowhere"], "error: nowhere/dataset.json not found: prepare the data with"),
    (["--pretrained", "missing.pth", "--epochs", "1"], "error: --pretrained missing.pth: file not found"),
    (["--resume", "no-such-run"], "error: config file no-such-run/config.yaml not found"),
])
def test_user_errors_are_one_line_exit_2(tmp_path, digits_shards, args, message):
    if "--pretrained" in args:
        args = ["--data", digits_shards, *args]
    result = run_main(tmp_path, *args)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr and "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [
        next(line for line in result.stderr.splitlines() if line.startswith("error:"))]


def test_resume_folder_without_checkpoint_and_missing_split(tmp_path, digits_shards):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text(f"data: {digits_shards}\n")
    result = run_main(tmp_path, "--resume", tmp_path / "run")
    assert result.returncode == 2 and "error: --resume" in result.stderr and "no checkpoint" in result.stderr
    assert "Traceback" not in result.stderr
    result = run_main(tmp_path, "--data", digits_shards, "--eval_splits", "holdout")
    assert result.returncode == 2 and "has no split 'holdout'" in result.stderr and "Traceback" not in result.stderr


def test_user_error_under_accelerate_two_ranks_prints_once(tmp_path):
    cmd = accelerate_cmd("train/main.py", "--lr_rate", "0.1")
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=cpu_env())
    assert result.returncode != 0
    assert result.stderr.count("error: command line: unknown key 'lr_rate'") == 1  # the first rank only
