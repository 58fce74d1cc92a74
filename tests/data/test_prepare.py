"""data.prepare on miniature trees in every real layout: counts, labels, ids, manifest, determinism."""
import json
import tarfile

import numpy as np
import pytest
from conftest import make_cifar10, make_cifar100, make_clothing1m, make_webvision, write_jpeg, write_lines

from data.prepare import TooManySkipped, build_parser, main, prepare
from data.reader import ShardDataset
from data.sources import AnnotationError


def run_prepare(*argv):
    return prepare(build_parser().parse_args([str(a) for a in argv]))


def members(tar_path):
    with tarfile.open(tar_path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar}


@pytest.mark.parametrize("annotations_subdir,images_level", [(False, True), (True, False)])
def test_clothing1m_both_layouts(tmp_path, annotations_subdir, images_level):
    tree = make_clothing1m(tmp_path / "raw", annotations_subdir, images_level)
    out = tmp_path / "shards"
    result = run_prepare("clothing1m", "--root", tmp_path / "raw", "--out", out, "--max-skip-fraction", "0.1")
    assert result["train"]["count"] == 28  # 30 keys, one corrupt and one missing skipped
    reasons = {s["key"]: s["reason"] for s in result["train"]["skipped"]}
    assert reasons[tree["corrupt"]].startswith("undecodable")
    assert reasons[tree["missing"]].startswith("missing")
    assert result["val"]["count"] == 6 and result["test"]["count"] == 6
    ds = ShardDataset(out / "train")
    keys = list(ds.sources)
    comma_key = tree["train"][3][0]
    assert "," in comma_key and comma_key in keys
    given = dict(tree["train"])
    assert [given[k] for k in keys] == ds.labels.tolist()
    # true labels only where the clean list knows the train key; one of them disagrees (real noise)
    known = {k: t for k, t in zip(keys, ds.true_labels) if t >= 0}
    assert known == tree["clean_train"]
    assert result["train"]["realised_noise_rate"] == 0.5
    test = ShardDataset(out / "test")
    assert test.labels.tolist() == [c for _, c in tree["test"]]
    assert (test.true_labels == test.labels).all()
    manifest = json.loads((out / "dataset.json").read_text())
    assert manifest["format_version"] == 1 and manifest["num_classes"] == 14
    assert manifest["class_names"][13] == "class13"
    assert len(manifest["splits"]["train"]["skipped"]) == 2


def test_clothing1m_image_bytes_unchanged_and_resize(tmp_path):
    make_clothing1m(tmp_path / "raw")
    run_prepare("clothing1m", "--root", tmp_path / "raw", "--out", tmp_path / "a", "--max-skip-fraction", "0.1")
    ds = ShardDataset(tmp_path / "a" / "test")
    raw = (tmp_path / "raw" / ds.sources[0]).read_bytes()
    assert ds.read_bytes(0) == raw  # no re-encode without --resize
    run_prepare("clothing1m", "--root", tmp_path / "raw", "--out", tmp_path / "b", "--resize", "5",
                "--splits", "test")
    small = ShardDataset(tmp_path / "b" / "test")
    assert min(small.load_image(0).size) == 5


def test_too_many_skips_fails_and_writes_nothing_but_the_skip_report(tmp_path):
    make_clothing1m(tmp_path / "raw")
    with pytest.raises(TooManySkipped, match="max-skip-fraction"):
        run_prepare("clothing1m", "--root", tmp_path / "raw", "--out", tmp_path / "s")
    assert not (tmp_path / "s" / "dataset.json").exists() and not (tmp_path / "s" / "train").exists()
    reasons = {item["reason"].split(":")[0] for item in json.loads((tmp_path / "s" / "skipped-train.json").read_text())}
    assert reasons == {"missing", "undecodable"}
    assert not list((tmp_path / "s").glob(".prepare-*"))  # the staging folder is gone


def test_malformed_annotation_names_file_and_line(tmp_path, caplog):
    make_clothing1m(tmp_path / "raw")
    kv = tmp_path / "raw" / "noisy_label_kv.txt"
    lines = kv.read_bytes().split(b"\r\n")
    lines[4] = b"images/0/00/broken.jpg"  # label missing on line 5
    kv.write_bytes(b"\r\n".join(lines))
    with pytest.raises(AnnotationError, match=r"noisy_label_kv.txt:5: expected '<key> <label>'"):
        run_prepare("clothing1m", "--root", tmp_path / "raw", "--out", tmp_path / "s")
    lines[4] = b"images/0/00/broken.jpg 14"
    kv.write_bytes(b"\r\n".join(lines))
    with pytest.raises(AnnotationError, match=r"noisy_label_kv.txt:5: label 14 out of range 0..13"):
        run_prepare("clothing1m", "--root", tmp_path / "raw", "--out", tmp_path / "s")
    assert main(["clothing1m", "--root", str(tmp_path / "raw"), "--out", str(tmp_path / "s")]) == 2
    lines[4] = b"images/0/00/broken.jpg 3"
    kv.write_bytes(b"\r\n".join(lines))
    (tmp_path / "raw" / "clean_label_kv.txt").unlink()
    with pytest.raises(AnnotationError, match="clean_label_kv.txt: annotation file not found"):
        run_prepare("clothing1m", "--root", tmp_path / "raw", "--out", tmp_path / "s")


def test_byte_identical_reruns(tmp_path, digits_shards):
    run_prepare("digits", "--out", tmp_path / "again", "--noise", "symmetric:0.4", "--val-fraction", "0.1")
    for split in ("train", "val", "test"):
        a = (digits_shards / split / "shard-000000.tar").read_bytes()
        assert a == (tmp_path / "again" / split / "shard-000000.tar").read_bytes()


def test_digits_manifest_and_sample_fields(digits_shards):
    manifest = json.loads((digits_shards / "dataset.json").read_text())
    train = manifest["splits"]["train"]
    assert train["count"] == 1294 and manifest["splits"]["val"]["count"] == 143
    assert manifest["splits"]["test"]["count"] == 360
    assert 0.35 < train["realised_noise_rate"] < 0.45
    assert manifest["noise"]["spec"] == "symmetric:0.4"
    index = json.loads((digits_shards / "train" / "index.json").read_text())
    assert index["wids_version"] == 1 and sum(s["nsamples"] for s in index["shardlist"]) == 1294
    fields = members(digits_shards / "train" / "shard-000000.tar")
    assert fields["000000005.idx"] == b"5"
    assert {"000000005.png", "000000005.cls", "000000005.true.cls", "000000005.src.txt"} <= set(fields)


def test_shard_rollover_keeps_dense_ids(tmp_path):
    run_prepare("digits", "--out", tmp_path, "--shard-size", "500", "--splits", "train")
    ds = ShardDataset(tmp_path / "test")
    assert len(ds.shard_paths) == 1
    train = ShardDataset(tmp_path / "train")
    assert len(train.shard_paths) == 3 and len(train) == 1437
    assert train[1200][2] == 1200 and train.shard[1200] == 2


def test_webvision_mini_and_full(tmp_path):
    tree = make_webvision(tmp_path / "raw")
    mini = run_prepare("webvision", "--root", tmp_path / "raw", "--out", tmp_path / "mini")
    assert mini["train"]["count"] == 100 and mini["val"]["count"] == 50  # labels < 50, Google only
    manifest = json.loads((tmp_path / "mini" / "dataset.json").read_text())
    assert manifest["num_classes"] == 50 and manifest["class_names"][0] == "thing0, other0"
    assert manifest["wnids"][1] == "n01440765"
    full = run_prepare("webvision", "--root", tmp_path / "raw", "--out", tmp_path / "full", "--subset", "full",
                       "--sources", "google,flickr", "--num-classes", "60")
    assert full["train"]["count"] == len(tree["google"]) + len(tree["flickr"])
    ds = ShardDataset(tmp_path / "full" / "train")
    assert ds.sources[-1].startswith("flickr/")


def ilsvrc_images(root, wnids, per_class=2, folders=True):
    names = []
    n = 0
    for w in wnids:
        for _ in range(per_class):
            n += 1
            name = f"ILSVRC2012_val_{n:08d}.JPEG"
            write_jpeg(root / w / name if folders else root / name, n)
            names.append((name, w))
    return names


def test_ilsvrc12_val_three_layouts(tmp_path):
    from scipy.io import savemat

    make_webvision(tmp_path / "wv")
    synsets = tmp_path / "wv" / "info" / "synsets.txt"
    wnids = [f"n{1440764 + c:08d}" for c in (0, 1, 49, 50)]  # class 50 is outside mini
    expected = [0, 0, 1, 1, 49, 49]
    # 1) wnid folders
    ilsvrc_images(tmp_path / "a" / "val", wnids)
    res = run_prepare("ilsvrc12-val", "--root", tmp_path / "a" / "val", "--out", tmp_path / "sa",
                      "--synsets", synsets, "--num-classes", "50")
    assert res["ilsvrc12_val"]["count"] == 6
    assert ShardDataset(tmp_path / "sa" / "ilsvrc12_val").labels.tolist() == expected
    # 2) flat + LOC_val_solution.csv (rows in arbitrary order)
    names = ilsvrc_images(tmp_path / "b" / "val", wnids, folders=False)
    rows = [f"{n.split('.')[0]},{w} 1 2 3 4 {w} 5 6 7 8" for n, w in reversed(names)]
    write_lines(tmp_path / "b" / "LOC_val_solution.csv", ["ImageId,PredictionString", *rows])
    run_prepare("ilsvrc12-val", "--root", tmp_path / "b" / "val", "--out", tmp_path / "sb", "--synsets", synsets,
                "--num-classes", "50")
    assert ShardDataset(tmp_path / "sb" / "ilsvrc12_val").labels.tolist() == expected
    # 3) flat + devkit: ILSVRC2012_IDs deliberately NOT in sorted-wnid order
    names = ilsvrc_images(tmp_path / "c" / "val", wnids, folders=False)
    ids = {w: 1000 - i for i, w in enumerate(wnids)}
    meta = np.zeros(4, dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O")])
    for i, w in enumerate(wnids):
        meta[i] = (ids[w], w)
    devkit = tmp_path / "c" / "devkit"
    devkit.mkdir()
    savemat(devkit / "meta.mat", {"synsets": meta})
    write_lines(devkit / "ILSVRC2012_validation_ground_truth.txt", [str(ids[w]) for _, w in names])
    run_prepare("ilsvrc12-val", "--root", tmp_path / "c" / "val", "--out", tmp_path / "sc", "--synsets", synsets,
                "--num-classes", "50", "--devkit", devkit)
    assert ShardDataset(tmp_path / "sc" / "ilsvrc12_val").labels.tolist() == expected


def test_cifar10_asymmetric_noise(tmp_path):
    make_cifar10(tmp_path / "raw")
    res = run_prepare("cifar10", "--root", tmp_path / "raw", "--out", tmp_path / "s", "--noise", "asymmetric:1.0")
    assert res["train"]["count"] == 40 and res["test"]["count"] == 5
    ds = ShardDataset(tmp_path / "s" / "train")
    pairs = {9: 1, 2: 0, 4: 7, 3: 5, 5: 3}
    for given, true in zip(ds.labels, ds.true_labels):
        assert given == pairs.get(int(true), true)
    assert ds.load_image(0).size == (32, 32)


def test_cifar100_next_in_superclass(tmp_path):
    make_cifar100(tmp_path / "raw")
    run_prepare("cifar100", "--root", tmp_path / "raw", "--out", tmp_path / "s", "--noise", "asymmetric:1.0")
    ds = ShardDataset(tmp_path / "s" / "train")
    # the archive's super-classes are c // 5 here: next inside the group of five, circularly
    assert all(g == (t // 5) * 5 + (t % 5 + 1) % 5 for g, t in zip(ds.labels, ds.true_labels))


def test_folder(tmp_path):
    for c in ("cat", "dog"):
        for j in range(3):
            write_jpeg(tmp_path / "raw" / c / f"{j}.jpg", j)
    res = run_prepare("folder", "--root", tmp_path / "raw", "--out", tmp_path / "s", "--noise", "pairflip:1.0")
    assert res["train"]["count"] == 6
    ds = ShardDataset(tmp_path / "s" / "train")
    assert ds.true_labels.tolist() == [0, 0, 0, 1, 1, 1] and ds.labels.tolist() == [1, 1, 1, 0, 0, 0]


def test_ilsvrc12_val_from_imagenet_root(tmp_path):
    """torchvision's ImageNet(root, split="val") takes the root: val/ inside, LOC_val_solution.csv beside it."""
    make_webvision(tmp_path / "wv")
    synsets = tmp_path / "wv" / "info" / "synsets.txt"
    wnids = [f"n{1440764 + c:08d}" for c in (0, 1, 49, 50)]
    names = ilsvrc_images(tmp_path / "imagenet" / "val", wnids, folders=False)
    write_lines(tmp_path / "imagenet" / "LOC_val_solution.csv",
                ["ImageId,PredictionString", *[f"{n.split('.')[0]},{w} 1 2 3 4" for n, w in names]])
    res = run_prepare("ilsvrc12-val", "--root", tmp_path / "imagenet", "--out", tmp_path / "s", "--synsets", synsets,
                      "--num-classes", "50")
    assert res["ilsvrc12_val"]["count"] == 6
    ilsvrc_images(tmp_path / "imagenet2" / "val", wnids)  # wnid folders under root/val
    res = run_prepare("ilsvrc12-val", "--root", tmp_path / "imagenet2", "--out", tmp_path / "s2", "--synsets", synsets,
                      "--num-classes", "50")
    assert res["ilsvrc12_val"]["count"] == 6


def test_split_with_no_samples_is_an_error(tmp_path, caplog):
    make_webvision(tmp_path / "wv")
    (tmp_path / "empty" / "val").mkdir(parents=True)
    argv = ["ilsvrc12-val", "--root", str(tmp_path / "empty"), "--out", str(tmp_path / "s"),
            "--synsets", str(tmp_path / "wv" / "info" / "synsets.txt"), "--num-classes", "50",
            "--solution", str(tmp_path / "none.csv")]
    write_lines(tmp_path / "none.csv", ["ImageId,PredictionString"])
    assert main(argv) == 2
    assert "split 'ilsvrc12_val' would be written with 0 samples" in caplog.text
    assert not (tmp_path / "s" / "dataset.json").exists()


def test_val_fraction_is_stratified_noisy_and_deterministic(tmp_path):
    make_cifar10(tmp_path / "raw")  # 40 train samples, 4 per class
    res = run_prepare("cifar10", "--root", tmp_path / "raw", "--out", tmp_path / "s", "--noise", "symmetric:0.5",
                      "--seed", "3", "--val-fraction", "0.25")
    assert res["train"]["count"] + res["val"]["count"] == 40 and res["test"]["count"] == 5
    val, train = ShardDataset(tmp_path / "s" / "val"), ShardDataset(tmp_path / "s" / "train")
    assert (val.true_labels >= 0).all() and (val.labels != val.true_labels).any()  # noisy labels kept, truth too
    assert set(val.sources).isdisjoint(train.sources)
    counts = np.bincount(np.concatenate([val.labels, train.labels]), minlength=10)
    val_counts = np.bincount(val.labels, minlength=10)
    assert val_counts.tolist() == [int(round(0.25 * c)) for c in counts]  # stratified by the given label
    manifest = json.loads((tmp_path / "s" / "dataset.json").read_text())
    assert manifest["val_split"]["fraction"] == 0.25
    again = run_prepare("cifar10", "--root", tmp_path / "raw", "--out", tmp_path / "t", "--noise", "symmetric:0.5",
                        "--seed", "3", "--val-fraction", "0.25")
    assert ShardDataset(tmp_path / "t" / "val").sources.tolist() == val.sources.tolist()
    assert again["val"] == res["val"]


def test_train_subset_is_stratified(tmp_path):
    make_cifar100(tmp_path / "raw")  # 400 train samples, 4 per class
    res = run_prepare("cifar100", "--root", tmp_path / "raw", "--out", tmp_path / "s", "--train-subset", "200")
    assert res["train"]["count"] == 200 and res["test"]["count"] == 20
    assert np.bincount(ShardDataset(tmp_path / "s" / "train").labels, minlength=100).tolist() == [2] * 100
