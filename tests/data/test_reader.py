"""Read by sample id: round trips through DataLoader workers, damaged shards, stale offset tables."""
import shutil

import numpy as np
import torch
from PIL import Image

from data.reader import ShardDataset, collate_with_skips, id_loader
from data.shards import build_offset_table
from data.transforms import EvalTransform, TrainTransform, get_preset


def test_round_trip_two_workers_matches_direct_reads(digits_shards):
    from sklearn.datasets import load_digits

    ds = ShardDataset(digits_shards / "train", transform=EvalTransform(preset=get_preset("digits")), mode="L")
    batches = [np.array([1200, 3, 77, 3]), np.array([0, 1293, 500])]
    seen = []
    for batch in id_loader(ds, batches, workers=2):
        seen.append(batch["ids"].tolist())
        assert batch["skipped"] == 0
    assert seen == [b.tolist() for b in batches]
    raw = ds.with_transform(EvalTransform(preset=get_preset("digits"), normalise=False))
    uint8 = next(iter(id_loader(raw, batches[:1], workers=2)))["images"]  # travels from the workers as uint8
    assert uint8.dtype == torch.uint8
    assert torch.equal(raw.to_device(uint8, "cpu"), next(iter(id_loader(ds, batches[:1])))["images"])
    # the pixels are the scikit-learn digit named by the source key
    digits = load_digits()
    source_index = int(ds.sources[77].split("/")[1])
    pixels = np.asarray(ds.load_image(77), dtype=np.float64)
    assert np.abs(pixels * 16 / 255 - digits.images[source_index]).max() < 0.05
    assert ds.labels[77] != -1 and ds.true_labels[77] == digits.target[source_index]


def test_transforms_shapes(digits_shards):
    preset = get_preset("digits")
    ds = ShardDataset(digits_shards / "test", transform=EvalTransform(preset=preset), mode="L")
    image, label, idx = ds[5]
    assert image.shape == (1, 8, 8) and idx == 5 and label == ds.labels[5]
    assert torch.equal(ds[5][0], image)  # eval transform is deterministic
    big = get_preset("clothing1m")
    img = Image.fromarray(np.zeros((300, 400, 3), dtype=np.uint8))
    assert TrainTransform(preset=big)(img).shape == (3, 224, 224)
    assert EvalTransform(preset=get_preset("webvision-mini", 299))(img).shape == (3, 299, 299)


def test_corrupt_sample_in_shard_is_skipped_and_counted(tmp_path, digits_shards):
    split = tmp_path / "train"
    shutil.copytree(digits_shards / "test", split)
    ds = ShardDataset(split, mode="L")
    offset, size = int(ds.offset[4]), int(ds.size[4])
    with open(split / "shard-000000.tar", "r+b") as f:  # damage the bytes of sample 4 in place
        f.seek(offset)
        f.write(b"\0" * size)
    ds = ShardDataset(split, transform=EvalTransform(preset=get_preset("digits")), mode="L")
    assert ds[4] == (None, -1, 4)  # unreadable: no image, the sample id kept
    assert ds.read_error(4) and not ds.read_error(3)
    batch = next(iter(id_loader(ds, [np.array([3, 4, 5])], workers=0)))
    assert batch["skipped"] == 1 and batch["valid"].tolist() == [True, False, True]
    assert batch["skipped_ids"] == [4]
    assert batch["ids"].tolist() == [3, -1, 5] and batch["images"][1].abs().sum() == 0


def test_collate_all_skipped():
    batch = collate_with_skips([(None, -1, 3), (None, -1, 8)])
    assert batch["images"] is None and batch["skipped"] == 2 and batch["skipped_ids"] == [3, 8]


def test_stale_offset_table_is_rebuilt(tmp_path, digits_shards):
    split = tmp_path / "test"
    shutil.copytree(digits_shards / "test", split)
    table = build_offset_table(sorted(split.glob("shard-*.tar")))
    table["shard_sizes"] = table["shard_sizes"] + 1  # pretend the shard changed since
    np.savez(split / "offsets.npz", **table)
    ds = ShardDataset(split, mode="L")
    assert len(ds) == 360 and ds[359][2] == 359


def test_index_json_is_a_valid_wids_index(digits_shards):
    import wids

    ds = wids.ShardListDataset(str(digits_shards / "test" / "index.json"), localname=lambda p: p)
    assert len(ds) == 360
    sample = ds[7]  # wids decodes .cls and .png itself, hands out other members as file-like objects
    assert sample[".idx"].read() == b"7" and sample[".cls"] == ds_labels(digits_shards)[7]
    assert sample[".png"].size == (8, 8)


def ds_labels(root):
    return ShardDataset(root / "test").labels


def test_decoded_cache_gives_the_same_samples_through_forked_workers(tmp_path, digits_shards):
    split = tmp_path / "train"
    shutil.copytree(digits_shards / "test", split)
    with open(split / "shard-000000.tar", "r+b") as f:  # one damaged sample
        ds = ShardDataset(split, mode="L")
        f.seek(int(ds.offset[7]))
        f.write(b"\0" * int(ds.size[7]))
    preset = get_preset("digits")
    plain = ShardDataset(split, transform=EvalTransform(preset=preset), mode="L")
    cached = ShardDataset(split, transform=EvalTransform(preset=preset), mode="L")
    assert cached.cache_decoded(max_bytes=1 << 20) and cached.cached
    expected = {i: plain[i] for i in (0, 1, 5, 359)}
    (split / "shard-000000.tar").unlink()  # a cached split no longer reads its shards
    augmenting = cached.with_transform(TrainTransform(preset=preset))
    assert augmenting.cached and augmenting.transform is not cached.transform
    for i in (0, 5, 359):
        assert torch.equal(cached[i][0], expected[i][0]) and cached[i][1:] == expected[i][1:]
    assert cached[7][0] is None
    batches = [np.array([0, 7, 5]), np.array([359, 1])]
    for workers in (0, 2):
        out = list(id_loader(cached, batches, workers=workers))
        assert [b["skipped"] for b in out] == [1, 0]
        assert torch.equal(out[1]["images"][0], expected[359][0])


def test_decoded_cache_refuses_a_split_over_budget(digits_shards):
    ds = ShardDataset(digits_shards / "train", mode="L")
    assert not ds.cache_decoded(max_bytes=64 * 100)  # 1437 images of 64 bytes do not fit in 6,400 bytes
    assert not ds.cached and ds[3] is not None


def _crops(ds, seed, workers, first_step=0, steps=2):
    batches = [np.arange(8) + 8 * s for s in range(first_step, first_step + steps)]
    return [b["images"] for b in id_loader(ds, batches, workers, seed=seed, first_step=first_step)]


def test_augmentation_is_drawn_per_rank_and_step_whatever_the_workers(digits_shards):
    ds = ShardDataset(digits_shards / "train", transform=TrainTransform(preset=get_preset("digits")), mode="L")
    rank0, rank1 = 1009 * 7, 1009 * 7 + 1  # train/epoch.py's loader seed at epoch 7, ranks 0 and 1
    torch.manual_seed(0)
    before = torch.get_rng_state()
    a = _crops(ds, rank0, workers=0)
    assert torch.equal(torch.get_rng_state(), before)  # the global RNG (dropout, ...) is left as it was
    assert all(torch.equal(x, y) for x, y in zip(a, _crops(ds, rank0, workers=2)))  # 0 or 2 workers: same
    torch.manual_seed(0)  # both ranks start from the same global seed, as accelerate's set_seed leaves them
    b = _crops(ds, rank1, workers=0)
    assert not any(torch.equal(x, y) for x, y in zip(a, b))  # two ranks, same step: different crops
    # a run resumed at step 1 draws step 1's crops again
    assert torch.equal(_crops(ds, rank0, workers=0, first_step=1, steps=1)[0], a[1])
