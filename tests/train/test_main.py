"""End to end through `accelerate launch` on 2 CPU ranks (gloo): tables, checkpoints, resume, TensorBoard."""
import csv
import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO, accelerate_cmd, cpu_env

# MixNN with the global search: the sharded index, its neighbour table and diagnostics end to end (the
# default's in-batch neighbours run end to end, preempted and resumed, in tests/train/test_preempt.py)
ARGS = ["--epochs", "4", "--warmup_epochs", "1", "--correction_epoch", "2", "--progress", "false",
        "--eval_every", "2", "--config", str(REPO / "launch/configs/mixnn_global.yaml")]


def launch(tmp, *args, processes=2):
    cmd = accelerate_cmd("train/main.py", "--output", tmp / "runs", *args, processes=processes)
    result = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=600, env=cpu_env())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, digits_shards):
    tmp = tmp_path_factory.mktemp("full")
    result = launch(tmp, "--data", digits_shards, "--run_name", "full", *ARGS)
    return tmp / "runs" / "full", result


def test_two_rank_run_completes_with_identical_tables(full_run):
    run, result = full_run
    rows = list(csv.DictReader((run / "summary.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2, 3]
    refreshed = [r for r in rows if r["tables_checked_ranks"]]
    assert len(refreshed) == 3 and all(r["tables_checked_ranks"] == "2" for r in refreshed)
    assert float(rows[-1]["test_top1"]) > 30  # learning happened (10 classes: chance is 10%)
    assert rows[1]["test_top1"] and not rows[0]["test_top1"]  # eval_every 2
    final = json.loads((run / "final.json").read_text())
    assert 0 < final["last"]["label_correction_accuracy"] <= 1 and "noise_recall" in final["last"]
    assert "test_top1" in result.stdout  # the printed summary
    state = torch.load(run / "last.pt", weights_only=True)
    assert state["epoch"] == 4 and len(state["rng"]) == 2 and state["partners"].shape == (1294, 1)
    assert (run / "best.pt").is_file() and len(list((run / "checkpoints").glob("*.pt"))) == 2
    assert (run / "config.yaml").is_file()


def test_tensorboard_has_the_named_scalars(full_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, _ = full_run
    events = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0, "histograms": 0, "images": 0}).Reload()
    tags = set(events.Tags()["scalars"])
    for name in ("train/train_loss", "train/lr", "eval/test_top1", "eval/val_top1", "labels/label_correction_accuracy",
                 "noise/clean_fraction", "noise/noise_precision", "noise/noise_recall", "noise/noise_auc",
                 "time/time_refresh", "time/time_gmm", "time/time_knn", "time/time_gather", "time/time_check",
                 "time/time_plan", "time/time_partners", "time/time_metrics", "time/time_checkpoint",
                 "neighbours/neighbour_agreement",
                 "neighbours/nn_given_is_anchor_true", "neighbours/nn_chance_given_is_anchor_true",
                 "neighbours/nn_truly_clean", "neighbours/nn_noisy_anchor_dropped", "gmm/gmm_mean_clean",
                 "train/images_per_second", "memorisation/train_acc_given_truly_noisy"):
        assert name in tags, name
    assert not [t for t in tags if t.startswith("other/")]  # every scalar sits in a group
    assert len(events.Scalars("train/train_loss")) == 4
    assert "clean_probability/truly_noisy" in events.Tags()["histograms"]
    images = events.Tags()["images"]
    assert len(events.Images("gmm/loss_histogram")) == 3  # one per refresh
    for name in ("labels/likely_mislabelled", "labels/corrected_vs_given", "labels/corrected_vs_true"):
        assert name in images, name
    assert events.Images("gmm/loss_histogram")[0].width > 300  # a drawn figure, not a raw matrix


def test_resume_gives_the_same_weights(full_run, tmp_path, digits_shards):
    run, _ = full_run
    launch(tmp_path, "--data", digits_shards, "--run_name", "part", *ARGS[:1], "2", *ARGS[2:])
    part = tmp_path / "runs" / "part"
    assert torch.load(part / "last.pt", weights_only=True)["epoch"] == 2
    launch(tmp_path, "--resume", part, "--epochs", "4")
    resumed = torch.load(part / "last.pt", weights_only=True)
    reference = torch.load(run / "last.pt", weights_only=True)
    assert resumed["epoch"] == 4
    for key, value in reference["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    assert torch.equal(reference["targets"]["values"], resumed["targets"]["values"])
    rows = list(csv.DictReader((part / "summary.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2, 3]


def test_report_rows_match_the_run_tables_and_reproduce_from_checkpoint(full_run, tmp_path):

    run, _ = full_run
    state = torch.load(run / "last.pt", weights_only=True)
    rows = list(csv.DictReader((run / "labels.csv").open()))
    assert len(rows) == 1294
    values = state["targets"]["values"].float()
    for row in rows[:50]:
        i = int(row["sample_id"])
        assert int(row["corrected_label"]) == int(values[i].argmax())
        assert float(row["clean_prob"]) == pytest.approx(float(state["clean"][i]), abs=1e-4)
        assert row["neighbours"] == str(int(state["partners"][i, 0]))
        assert row["true_label"] != ""
    summary = (run / "labels_summary.md").read_text()
    assert "believed wrong" in summary and "precision of 'believed wrong'" in summary
    assert "![label issues](label_issues.png)" in summary and (run / "label_issues.png").stat().st_size > 10_000
    assert (run / "confusion_true_corrected.png").is_file() and (run / "confusion_given_corrected.png").is_file()
    original = (run / "labels.csv").read_bytes()
    (run / "labels.csv").unlink()
    result = subprocess.run([sys.executable, "-m", "train.report", "--run", str(run)], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert (run / "labels.csv").read_bytes() == original


def test_standalone_evaluate_matches_the_run(full_run, digits_shards, tmp_path):
    run, _ = full_run
    cmd = accelerate_cmd("train/evaluate.py", "--run", run, "--checkpoint", "last", "--split", digits_shards / "test")
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=cpu_env())
    assert result.returncode == 0, result.stderr[-3000:]
    evaluation = json.loads((run / "eval.json").read_text())["results"][str(digits_shards / "test")]
    final = json.loads((run / "final.json").read_text())
    assert evaluation["evaluated"] == 360 and evaluation["top1"] == pytest.approx(final["last"]["test_top1"])
    assert "| top-1 |" in result.stdout


def test_refresh_every_two_epochs_keeps_the_tables_between_refreshes(tmp_path, digits_shards):
    launch(tmp_path, "--data", digits_shards, "--run_name", "r2", "--epochs", "5", "--warmup_epochs", "1",
           "--correction_epoch", "1", "--refresh_every", "2", "--eval_every", "5", "--progress", "false",
           "--channels_last", "true", "--gmm_split", "class", "--gmm_scale", "log",
           processes=1)  # channels_last: NHWC weights through train, refresh, eval; per-class log-loss GMM
    rows = list(csv.DictReader((tmp_path / "runs" / "r2" / "summary.csv").open()))
    refreshed = [int(r["epoch"]) for r in rows if r.get("time_refresh")]
    assert refreshed == [1, 3]
    assert all(0 < float(rows[e]["clean_fraction"]) < 1 and float(rows[e]["noise_auc"]) > 0.6 for e in refreshed)
    assert all(float(r["train_images"]) > 0 for r in rows)


def test_bf16_autocast_on_two_cpu_ranks_keeps_tables_identical(tmp_path, digits_shards):
    """The GPU run's precision path (bf16 autocast, float32 casts of logits/embeddings, soft CE in float32)
    through PyTorch's CPU autocast: MixNN epochs with refreshes on 2 ranks."""
    launch(tmp_path, "--data", digits_shards, "--run_name", "bf16", "--mixed_precision", "bf16", "--epochs", "3",
           "--warmup_epochs", "1", "--correction_epoch", "1", "--eval_every", "3", "--progress", "false")
    rows = list(csv.DictReader((tmp_path / "runs" / "bf16" / "summary.csv").open()))
    assert all(r["tables_checked_ranks"] == "2" for r in rows[1:])  # refreshes 1, 2: CRC-identical on both ranks
    assert all(0 < float(r["train_loss"]) < 10 for r in rows)  # finite
    assert float(rows[-1]["test_top1"]) > 20
    assert json.loads((tmp_path / "runs" / "bf16" / "final.json").read_text())["mixed_precision"] == "bf16"
