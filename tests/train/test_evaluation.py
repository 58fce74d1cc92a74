"""Top-k against hand-computed logits, the sample-count guard, model selection on val (never test)."""
import numpy as np
import pytest

from train.loop import summarise_eval
from train.epoch import update_best
from train.metrics import noise_detection, topk_correct


def test_topk_by_hand():
    logits = np.array([[0.1, 0.5, 0.4, 0.0, -1, -2], [3, 2, 1, 0, -1, -2]])
    labels = np.array([2, 5])
    assert topk_correct(logits, labels, 1).tolist() == [False, False]
    assert topk_correct(logits, labels, 2).tolist() == [True, False]
    assert topk_correct(logits, labels, 5).tolist() == [True, False]
    assert topk_correct(logits, labels, 6).tolist() == [True, True]


def test_sample_count_guard_trips_on_padded_and_dropping_samplers():
    seen = np.array([[1.0, 1.0], [0.0, 1.0], [1.0, 1.0]])
    assert summarise_eval(seen, 3, np.array([0, 1, 2]))["top1"] == pytest.approx(200 / 3)
    with pytest.raises(RuntimeError, match="counted 1 samples twice"):
        summarise_eval(seen, 3, np.array([0, 1, 2, 0]))  # a DistributedSampler-style pad
    seen[2] = np.nan
    with pytest.raises(RuntimeError, match="dropped samples"):
        summarise_eval(seen, 3, np.array([0, 1]))
    assert summarise_eval(seen, 3, np.array([0, 1]), corrupt=1)["skipped"] == 1


def test_clothing1m_selection_uses_val_not_test():
    best = {"metric": -1.0, "epoch": -1}
    history = [{"epoch": 0, "val_top1": 70.0, "test_top1": 60.0},
               {"epoch": 1, "val_top1": 65.0, "test_top1": 75.0},  # best on test, not on val
               {"epoch": 2, "val_top1": 72.0, "test_top1": 71.0}]
    chosen = []
    for m in history:
        best, is_best = update_best(best, m, "val")
        chosen.append(is_best)
    assert chosen == [True, False, True]
    assert best["epoch"] == 2 and best["test_top1"] == 71.0 and best["split"] == "val"


def test_noise_detection_by_hand():
    clean = np.array([0.9, 0.2, 0.1, 0.8], np.float32)
    labels, true = np.array([0, 1, 1, 0]), np.array([0, 0, 1, 1])  # samples 1 and 3 truly noisy
    out = noise_detection(clean, labels, true, np.arange(4))
    assert out["noise_precision"] == 0.5 and out["noise_recall"] == 0.5


def test_evaluate_and_report_errors_are_one_line(tmp_path, digits_shards, capsys):
    from train.evaluate import main as evaluate_main
    from train.report import main as report_main

    assert evaluate_main(["--run", str(tmp_path / "nope"), "--split", str(digits_shards / "test")]) == 2
    assert "error: --run" in capsys.readouterr().err
    assert report_main(["--run", str(tmp_path / "nope")]) == 2
    assert "error: --run" in capsys.readouterr().err
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "best.pt").write_bytes(b"not a checkpoint")
    assert evaluate_main(["--run", str(tmp_path / "run"), "--split", str(digits_shards / "test")]) == 2
    assert "cannot be read as a checkpoint" in capsys.readouterr().err
