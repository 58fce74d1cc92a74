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
    (["--resume", "no-such-run"], "error: --resume no-such-run: no such run folder"),
    (["--epochs", "-3"], "error: --epochs must be >= 1, got -3"),
    (["--mixed_precision", "fp16"], "error: --mixed_precision fp16 is not supported"),
    (["--model", "resnet5O"], "error: --model 'resnet5O': unknown model (did you mean"),
    (["--config", "BAD_YAML"], "not valid YAML"),
    (["--batch_size", "5000"], "error: --batch_size 5000 is larger than the training split (1294 samples"),
])
def test_user_errors_are_one_line_exit_2(tmp_path, digits_shards, args, message):
    if "--pretrained" in args or "5000" in args:
        args = ["--data", digits_shards, *args]
    if "BAD_YAML" in args:
        (tmp_path / "bad.yaml").write_text("method: ce\nlr: [0.1\nepochs: 3\n")
        args = ["--config", tmp_path / "bad.yaml"]
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


@pytest.mark.parametrize("args,message", [
    (["--ema", "7"], "--ema must be in [0, 1)"),
    (["--keep_checkpoints", "0"], "--keep_checkpoints must be >= 1"),
    (["--batch_size", "0"], "--batch_size must be >= 1"),
    (["--eval_every", "0"], "--eval_every must be >= 1"),
    (["--restart_period", "0"], "--restart_period must be >= 1 epoch"),
    (["--workers", "-1"], "--workers must be >= 0"),
    (["--lr", "-1"], "--lr must be > 0"),
    (["--lr", "nan"], "--lr must be > 0, got nan"),
    (["--val_fraction", "1"], "--val_fraction must be in [0, 1)"),
    (["--metric", "cosinus"], "--metric must be one of l2, cosine, got 'cosinus' (did you mean 'cosine'?)"),
    (["--knn_index", "hnws"], "--knn_index must be one of exact, hnsw, ivf, clustered, got 'hnws' (did you "
                              "mean 'hnsw'?)"),
    (["--noise", "symetric:0.4"], "--noise 'symetric:0.4': expected one of"),
    (["--run_name", "a/b"], "--run_name 'a/b' must be a plain folder name"),
    (["--select_split", "holdout"], "--select_split 'holdout' is not one of --eval_splits"),
])
def test_every_setting_is_checked_before_any_work(args, message):
    from train.config import ConfigError, load_config

    with pytest.raises(ConfigError) as caught:
        load_config(args)
    assert message in str(caught.value)
