"""Fashion-MNIST / MNIST from the four IDX files: gzip or not, magic numbers and sizes checked, the real
Debian package's files when they are installed."""
import gzip
from pathlib import Path

import numpy as np
import pytest

from data.prepare import main
from data.reader import ShardDataset
from data.sources import read_idx

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx_set(root: Path, n_train=30, n_test=10, gz=True, seed=0) -> dict:
    """The four IDX files of a tiny MNIST-format data set; labels cycle through the 10 classes."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        for kind, array, magic in (("images-idx3", images, 0x803), ("labels-idx1", labels, 0x801)):
            data = idx_bytes(array, magic)
            path = root / f"{prefix}-{kind}-ubyte"
            if gz:
                path = path.with_name(path.name + ".gz")
                data = gzip.compress(data, mtime=0)
            path.write_bytes(data)
        out[prefix] = (images, labels)
    return out


@pytest.mark.parametrize("gz", [True, False])
def test_prepare_fashion_mnist_from_idx(tmp_path, gz):
    arrays = write_idx_set(tmp_path / "raw", gz=gz)
    assert main(["fashion-mnist", "--root", str(tmp_path / "raw"), "--out", str(tmp_path / "s"),
                 "--noise", "symmetric:0.5", "--val-fraction", "0.2"]) == 0
    train, test, val = (ShardDataset(tmp_path / "s" / s, mode="L") for s in ("train", "test", "val"))
    assert (len(train), len(val), len(test)) == (24, 6, 10)
    images, labels = arrays["t10k"]
    assert test.labels.tolist() == labels.tolist() and test.sources[3] == "t10k/3"
    assert np.array_equal(np.asarray(test.load_image(3)), images[3])  # pixels kept exactly (PNG)
    key = int(train.sources[0].split("/")[1])  # source key = index in the IDX file
    assert np.array_equal(np.asarray(train.load_image(0)), arrays["train"][0][key])
    assert train.true_labels.tolist() == [int(arrays["train"][1][int(s.split("/")[1])]) for s in train.sources]


def test_mnist_names_and_fashion_names(tmp_path):
    import json

    write_idx_set(tmp_path / "raw")
    main(["mnist", "--root", str(tmp_path / "raw"), "--out", str(tmp_path / "m")])
    main(["fashion-mnist", "--root", str(tmp_path / "raw"), "--out", str(tmp_path / "f")])
    assert json.loads((tmp_path / "m" / "dataset.json").read_text())["class_names"][3] == "3"
    assert json.loads((tmp_path / "f" / "dataset.json").read_text())["class_names"][9] == "Ankle boot"


@pytest.mark.parametrize("damage", ["truncated", "magic", "count", "truncated_gz", "missing"])
def test_bad_idx_files_are_clear_errors(tmp_path, caplog, damage):
    write_idx_set(tmp_path / "raw", gz=damage == "truncated_gz")
    images = tmp_path / "raw" / "train-images-idx3-ubyte"
    labels = tmp_path / "raw" / "train-labels-idx1-ubyte"
    if damage == "truncated":
        images.write_bytes(images.read_bytes()[:-100])
        expect = "truncated"
    elif damage == "magic":
        data = bytearray(labels.read_bytes())
        data[3] = 0x03  # an images magic in a labels file
        labels.write_bytes(bytes(data))
        expect = "magic number 0x00000803, expected 0x00000801"
    elif damage == "count":
        labels.write_bytes(idx_bytes(np.zeros(29, np.uint8), 0x801))
        expect = "29 labels for 30 images"
    elif damage == "truncated_gz":
        gz = images.with_name(images.name + ".gz")
        gz.write_bytes(gz.read_bytes()[:-200])
        expect = "damaged or truncated"
    else:
        labels.unlink()
        expect = "not found"
    assert main(["fashion-mnist", "--root", str(tmp_path / "raw"), "--out", str(tmp_path / "s")]) == 2
    assert expect in caplog.text and "train-" in caplog.text  # names the file


def test_read_idx_shape(tmp_path):
    write_idx_set(tmp_path, n_train=5, gz=False)
    assert read_idx(tmp_path / "train-images-idx3-ubyte", "images").shape == (5, 28, 28)


@pytest.mark.skipif(not (FASHION_MNIST / "train-labels-idx1-ubyte.gz").is_file(),
                    reason="Debian's dataset-fashion-mnist is not installed (.ci/run installs it)")
def test_real_fashion_mnist_package(tmp_path):
    assert main(["fashion-mnist", "--root", str(FASHION_MNIST), "--out", str(tmp_path / "s"), "--workers", "2"]) == 0
    train, test = ShardDataset(tmp_path / "s" / "train", mode="L"), ShardDataset(tmp_path / "s" / "test", mode="L")
    assert (len(train), len(test)) == (60000, 10000)
    assert np.bincount(train.labels).tolist() == [6000] * 10 and np.bincount(test.labels).tolist() == [1000] * 10
    assert train.load_image(0).size == (28, 28)
