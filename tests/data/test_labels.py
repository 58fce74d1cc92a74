"""Given labels from outside: CIFAR-N human label files (the published torch.save format) and user CSVs."""
import json
import pickle

import numpy as np
import pytest
import torch
from conftest import make_cifar10, make_cifar100

from data.labels import load_label_arrays
from data.prepare import build_parser, main, prepare
from data.reader import ShardDataset
from data.sources import AnnotationError


def run_prepare(*argv):
    return prepare(build_parser().parse_args([str(a) for a in argv]))


def archive_labels(out):
    ds = ShardDataset(out / "train")
    return ds.labels, ds.true_labels, list(ds.sources)


def cifar10n_file(path, clean, legacy=False, **changes):
    """A CIFAR-10_human.pt of the published layout: torch.save of a dict of int64 numpy arrays."""
    rng = np.random.default_rng(0)
    worse = clean.copy()
    flip = np.arange(len(clean)) % 5 < 2  # 40% wrong
    worse[flip] = (clean[flip] + 1 + rng.integers(0, 9, flip.sum())) % 10
    arrays = {"clean_label": clean, "worse_label": worse, "aggre_label": clean.copy(),
              "random_label1": worse.copy(), "random_label2": clean.copy(), "random_label3": clean.copy()}
    arrays.update(changes)
    torch.save(arrays, path, _use_new_zipfile_serialization=not legacy)
    return arrays


@pytest.fixture
def cifar10(tmp_path):
    make_cifar10(tmp_path / "raw")  # 40 train samples, 4 per class
    run_prepare("cifar10", "--root", tmp_path / "raw", "--out", tmp_path / "plain")
    labels, _, keys = archive_labels(tmp_path / "plain")
    return tmp_path, labels.astype(np.int64), keys


@pytest.mark.parametrize("legacy", [False, True])
def test_cifar10n_worse_becomes_the_given_labels(cifar10, legacy):
    tmp_path, clean, _ = cifar10
    arrays = cifar10n_file(tmp_path / "CIFAR-10_human.pt", clean, legacy=legacy)
    out = tmp_path / "n"
    res = run_prepare("cifar10", "--root", tmp_path / "raw", "--out", out, "--human-labels",
                      tmp_path / "CIFAR-10_human.pt", "--label-set", "worse")
    labels, true, _ = archive_labels(out)
    assert labels.tolist() == arrays["worse_label"].tolist() and true.tolist() == clean.tolist()
    assert res["train"]["realised_noise_rate"] == pytest.approx(0.4)
    noise = json.loads((out / "dataset.json").read_text())["noise"]
    assert noise["kind"] == "human" and noise["label_set"] == "worse" and noise["realised_rate"] == pytest.approx(0.4)
    t, present = np.array(noise["transition_matrix"]), np.unique(clean)
    assert t.shape == (10, 10) and np.allclose(t[present].sum(1), 1)
    c = present[0]
    assert t[c, c] == pytest.approx((arrays["worse_label"][clean == c] == c).mean())
    # the test split keeps the archive's labels
    assert (ShardDataset(out / "test").labels == ShardDataset(out / "test").true_labels).all()


def test_cifar100n_noisy_label_set(tmp_path):
    make_cifar100(tmp_path / "raw")  # 400 train samples
    run_prepare("cifar100", "--root", tmp_path / "raw", "--out", tmp_path / "plain")
    clean = archive_labels(tmp_path / "plain")[0].astype(np.int64)
    noisy = (clean + (np.arange(400) % 10 == 0)) % 100
    torch.save({"clean_label": clean, "noisy_label": noisy, "noisy_coarse_label": clean // 5,
                "clean_coarse_label": clean // 5}, tmp_path / "CIFAR-100_human.pt")
    run_prepare("cifar100", "--root", tmp_path / "raw", "--out", tmp_path / "n", "--human-labels",
                tmp_path / "CIFAR-100_human.pt", "--label-set", "noisy")
    labels, true, _ = archive_labels(tmp_path / "n")
    assert labels.tolist() == noisy.tolist() and (labels != true).mean() == pytest.approx(0.1)


@pytest.mark.parametrize("change,message", [
    ({"worse_label": np.zeros(39, dtype=np.int64)}, r"worse_label has shape \(39,\); the train split has 40"),
    ({"worse_label": np.full(40, 10, dtype=np.int64)}, r"labels in 10..10; expected 0..9"),
    ({"worse_label": np.zeros(40, dtype=np.float32)}, "float32 values"),
    ({"clean_label": np.roll(np.arange(40) % 10, 1)}, "clean_label disagrees .* another order"),
])
def test_bad_human_label_files_are_named(cifar10, change, message):
    tmp_path, clean, _ = cifar10
    cifar10n_file(tmp_path / "h.pt", clean, **change)
    with pytest.raises(AnnotationError, match=message):
        run_prepare("cifar10", "--root", tmp_path / "raw", "--out", tmp_path / "n", "--human-labels",
                    tmp_path / "h.pt", "--label-set", "worse")


def test_human_label_files_are_never_unpickled_freely(tmp_path, capsys):
    torch.save({"clean_label": torch.zeros(4, dtype=torch.long)}, tmp_path / "tensors.pt")
    with pytest.raises(AnnotationError, match="not a dict of numpy arrays"):
        load_label_arrays(tmp_path / "tensors.pt")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    torch.save({"clean_label": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(AnnotationError, match="refusing to load .*print"):
        load_label_arrays(tmp_path / "evil.pt")
    assert "pwned" not in capsys.readouterr().out
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(AnnotationError, match="empty"):
        load_label_arrays(tmp_path / "empty.pt")
    (tmp_path / "raw.pkl").write_bytes(pickle.dumps({"clean_label": [1, 2]}))
    with pytest.raises(AnnotationError, match="wrong magic number"):
        load_label_arrays(tmp_path / "raw.pkl")


def test_human_label_options_are_checked(cifar10, caplog):
    tmp_path, clean, _ = cifar10
    cifar10n_file(tmp_path / "h.pt", clean)
    base = ["cifar10", "--root", str(tmp_path / "raw"), "--out", str(tmp_path / "n"), "--human-labels",
            str(tmp_path / "h.pt")]
    assert main(base) == 2 and "needs --label-set" in caplog.text
    assert main(base + ["--label-set", "noisy"]) == 2 and "cifar10 has aggre, worse" in caplog.text
    assert main(base + ["--label-set", "worse", "--noise", "symmetric:0.2"]) == 2
    assert "choose one source of noisy labels" in caplog.text
    torch.save({"clean_label": clean, "noisy_label": clean}, tmp_path / "c100.pt")
    assert main(base[:-1] + [str(tmp_path / "c100.pt"), "--label-set", "worse"]) == 2
    assert "needs ['clean_label', 'worse_label'] (is this the cifar10 file?)" in caplog.text


def test_labels_file_by_key_index_and_class_name(cifar10):
    tmp_path, clean, keys = cifar10
    csv = tmp_path / "relabel.csv"
    csv.write_text(f"key,label\n{keys[0]},{(clean[0] + 1) % 10}\n\n5,automobile\r\n{keys[7]},{clean[7]}\n")
    for replaces in ("clean", "noisy"):
        out = tmp_path / replaces
        run_prepare("cifar10", "--root", tmp_path / "raw", "--out", out, "--labels-file", csv,
                    "--labels-file-replaces", replaces)
        labels, true, _ = archive_labels(out)
        expected = clean.copy()
        expected[[0, 5]] = [(clean[0] + 1) % 10, 1]
        assert labels.tolist() == expected.tolist()
        info = json.loads((out / "dataset.json").read_text())["labels_file"]
        assert info["rows"] == 3 and info["changed"] == 1 + (clean[5] != 1) and info["replaces"] == replaces
        if replaces == "clean":  # the archive's labels were right: they stay the true labels
            assert true.tolist() == clean.tolist()
        else:  # the replaced labels were not trusted: those samples' true label is unknown
            assert (true[[0, 5, 7]] == -1).all() and (true[8:] == clean[8:]).all()


@pytest.mark.parametrize("rows,message", [
    ("data_batch_1/0,3\nnot/a/key,1\n", r"relabel.csv:2: unknown key 'not/a/key'"),
    ("data_batch_1/0,3\n0,4\n", r"relabel.csv:2: duplicate: sample 'data_batch_1/0' already labelled on line 1"),
    ("key,label\n3,10\n", r"relabel.csv:2: label 10 out of range 0..9"),
    ("3,zebra\n", r"relabel.csv:1: label 'zebra' is neither a class index nor a class name"),
    ("3,1,extra\n", r"relabel.csv:1: expected 2 fields"),
])
def test_bad_labels_file_rows_name_file_and_line(cifar10, rows, message):
    tmp_path, _, _ = cifar10
    (tmp_path / "relabel.csv").write_text(rows)
    with pytest.raises(AnnotationError, match=message):
        run_prepare("cifar10", "--root", tmp_path / "raw", "--out", tmp_path / "n", "--labels-file",
                    tmp_path / "relabel.csv")


def test_training_on_cifar10n_is_one_command(cifar10):
    """The shipped config on the prepared human labels (tiny model and schedule): noise metrics use the true labels."""
    import subprocess
    import sys

    from conftest import REPO, cpu_env

    tmp_path, clean, _ = cifar10
    cifar10n_file(tmp_path / "CIFAR-10_human.pt", clean)
    out = tmp_path / "shards" / "cifar10n-worse"
    assert main(["cifar10", "--root", str(tmp_path / "raw"), "--out", str(out), "--human-labels",
                 str(tmp_path / "CIFAR-10_human.pt"), "--label-set", "worse"]) == 0
    cmd = [sys.executable, str(REPO / "train" / "main.py"), "--config", str(REPO / "launch/configs/cifar10n.yaml"),
           "--model", "small_cnn", "--epochs", "3", "--warmup_epochs", "1", "--correction_epoch", "2",
           "--batch_size", "8", "--workers", "0", "--progress", "false", "--output", "runs", "--run_name", "n"]
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=cpu_env())
    assert result.returncode == 0, result.stderr[-3000:]
    final = json.loads((tmp_path / "runs" / "n" / "final.json").read_text())
    assert final["epochs"] == 3 and "test_top1" in final["last"]
    assert 0.0 <= final["last"]["label_correction_accuracy"] <= 1.0
