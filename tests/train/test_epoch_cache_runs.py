"""The epoch cache end to end on real JPEG shards (Clothing1M layout, one corrupt and one missing image): a
run reads each image through it, decodes each at most once per epoch, and gives exactly the results of the
same run without it, on 1 and 2 ranks."""
import csv

import pytest
import torch
from conftest import accelerate_cmd, cpu_env, make_clothing1m, run_module

COUNTERS = ("images_decoded", "images_from_cache", "decodes_per_trained_image")


@pytest.fixture(scope="module")
def clothing_shards(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("clothing")
    make_clothing1m(tmp / "raw")
    result = run_module("data.prepare", "clothing1m", "--root", tmp / "raw", "--out", tmp / "shards",
                        "--max-skip-fraction", "0.1")
    assert result.returncode == 0, result.stderr
    return tmp / "shards"


def train(tmp, shards, name, processes, *extra):
    import subprocess

    args = ["--dataset", "clothing1m", "--data", shards, "--image_size", "8", "--model", "small_cnn",
            "--batch_size", "8", "--epochs", "3", "--warmup_epochs", "1", "--correction_epoch", "1",
            "--eval_splits", "val,test", "--pretrained", "none", "--cache_images", "false", "--output", tmp,
            "--run_name", name, "--progress", "false", *extra]
    cmd = accelerate_cmd("train/main.py", *args, processes=processes)
    result = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=600, env=cpu_env())
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    rows = list(csv.DictReader((tmp / name / "summary.csv").open()))
    weights = torch.load(tmp / name / "last.pt", weights_only=True)["model"]
    return rows, weights, result.stdout + result.stderr


@pytest.mark.parametrize("processes,method", [(1, "mixnn"), (2, "dividemix")])
def test_the_epoch_cache_is_exact_and_decodes_each_image_once_an_epoch(tmp_path, clothing_shards, processes,
                                                                        method):
    extra = ["--method", method]
    cached, w_cached, log = train(tmp_path, clothing_shards, "cached", processes, *extra)
    plain, w_plain, _ = train(tmp_path, clothing_shards, "plain", processes, *extra, "--epoch_cache", "false")
    assert "epoch cache: 28 of 28 training images" in log
    results = lambda rows: [{k: v for k, v in r.items() if k not in COUNTERS and "seconds" not in k
                             and not k.startswith(("time_", "peak_rss", "images_per"))} for r in rows]
    assert results(cached) == results(plain)
    assert all(torch.equal(w_cached[k], w_plain[k]) for k in w_plain)
    decoded = [int(r["images_decoded"]) for r in cached]
    # the 28 training images (data.prepare left out the corrupt and the missing one): each decoded once, in
    # the first epoch's first pass; every later read, of any pass, epoch or rank, comes from the cache
    assert decoded == [28, 0, 0] and all(int(r["images_from_cache"]) > 0 for r in cached)
    without = [int(r["images_decoded"]) for r in plain]
    assert without[0] >= 28 and sum(without[1:]) > 2 * 28  # without it every pass decodes again
