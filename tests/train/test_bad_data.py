"""A shard damaged after preparation: the run skips and counts the sample, lists it, and finishes."""
import csv
import json
import shutil
import subprocess
import sys

from conftest import REPO

from data.reader import ShardDataset


def test_damaged_training_sample_is_skipped_and_counted(tmp_path, digits_shards):
    data = tmp_path / "data"
    shutil.copytree(digits_shards, data)
    ds = ShardDataset(data / "train")
    with open(data / "train" / "shard-000000.tar", "r+b") as f:
        for sample_id in (10, 11):
            f.seek(int(ds.offset[sample_id]))
            f.write(b"\0" * int(ds.size[sample_id]))
    cmd = [sys.executable, str(REPO / "train" / "main.py"), "--data", str(data), "--epochs", "2",
           "--warmup_epochs", "1", "--output", str(tmp_path / "runs"), "--run_name", "r", "--progress", "false"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader((tmp_path / "runs" / "r" / "summary.csv").open()))
    # warm-up reads every id in order (MixNN's `warmup_data: plain`), the last batch padded with the first ids
    # (1294 = 20 x 64 + 14: ids 0-49 twice): each damaged sample twice
    assert int(rows[0]["skipped_train"]) == 4
    assert int(rows[1]["skipped_train"]) >= 2  # MixNN: anchors, plus any group using them as neighbour
    final = json.loads((tmp_path / "runs" / "r" / "final.json").read_text())
    assert final["unreadable_train_samples"] == 2  # distinct samples, not reads
    listed = list(csv.DictReader((tmp_path / "runs" / "r" / "unreadable_train.csv").open()))
    assert [int(r["id"]) for r in listed] == [10, 11]
    assert listed[0]["source"] == str(ds.sources[10]) and listed[0]["error"]
    assert "2 distinct unreadable training samples" in result.stdout
