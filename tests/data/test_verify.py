"""Inputs checked before any training: shards against their manifest, preparation into an existing folder,
duplicate annotation keys, images of every mode Pillow reads, crash-safe file writes."""
import errno
import io
import json
import shutil
import tarfile

import numpy as np
import pytest
from conftest import make_clothing1m, write_lines
from PIL import Image

from data.atomic import WriteFailed, atomic_write_text
from data.images import convert_image
from data.prepare import build_parser, main, prepare
from data.reader import ShardDataset
from data.shards import ShardError, build_offset_table, read_manifest, verify_split
from data.sources import AnnotationError, read_clothing1m


def prepared_copy(digits_shards, tmp_path):
    out = tmp_path / "shards"
    shutil.copytree(digits_shards, out)
    return out, read_manifest(out)


def check(root, manifest, split="train", crc=False):
    return verify_split(root / split, manifest["splits"][split], manifest["num_classes"], crc=crc)


def test_intact_shards_pass_and_carry_a_size_crc_manifest(digits_shards, tmp_path):
    root, manifest = prepared_copy(digits_shards, tmp_path)
    entry = manifest["splits"]["train"]
    assert [s["name"] for s in entry["shards"]] == ["shard-000000.tar"]
    assert entry["shards"][0]["count"] == entry["count"] == 1294 and entry["shards"][0]["crc32"] > 0
    assert len(check(root, manifest, crc=True)["label"]) == 1294


def test_truncated_deleted_and_foreign_shards_are_refused(digits_shards, tmp_path):
    root, manifest = prepared_copy(digits_shards, tmp_path)
    shard = root / "train" / "shard-000000.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(ShardError, match="truncated or replaced"):
        check(root, manifest)
    shard.unlink()
    with pytest.raises(ShardError, match="shard-000000.tar listed in dataset.json is missing"):
        check(root, manifest)
    shard.write_bytes(data)
    shutil.copy(root / "test" / "shard-000000.tar", root / "train" / "shard-000001.tar")  # another split's shard
    with pytest.raises(ShardError, match="not in dataset.json"):
        check(root, manifest)
    (root / "train" / "shard-000001.tar").unlink()
    shutil.copy(root / "test" / "shard-000000.tar", shard)  # same name, foreign content
    with pytest.raises(ShardError, match="truncated or replaced"):
        check(root, manifest)


def test_same_size_replacement_is_caught_by_crc_and_labels(digits_shards, tmp_path):
    root, manifest = prepared_copy(digits_shards, tmp_path)
    shard = root / "train" / "shard-000000.tar"
    with tarfile.open(shard) as tar:  # flip one label byte in place: same size, same ids
        member = next(m for m in tar if m.name == "000000000.cls")
    data = bytearray(shard.read_bytes())
    old = data[member.offset_data]
    data[member.offset_data] = ord("9") if old != ord("9") else ord("8")
    shard.write_bytes(bytes(data))
    (root / "train" / "offsets.npz").unlink()
    with pytest.raises(ShardError, match="CRC-32 differs"):
        check(root, manifest, crc=True)
    with pytest.raises(ShardError, match="label histogram"):
        check(root, manifest)


def test_label_outside_the_class_range_and_overlapping_ids(digits_shards, tmp_path):
    root, manifest = prepared_copy(digits_shards, tmp_path)
    manifest["num_classes"] = 5
    with pytest.raises(ShardError, match=r"label \d, outside 0..4"):
        check(root, manifest)
    other = tmp_path / "other"
    (other).mkdir()
    shutil.copy(root / "train" / "shard-000000.tar", other / "shard-000000.tar")
    shutil.copy(root / "test" / "shard-000000.tar", other / "shard-000001.tar")  # ids 0..359 twice
    with pytest.raises(ShardError, match="also appears in shard-000000.tar"):
        build_offset_table(sorted(other.glob("shard-*.tar")))


def test_prepare_refuses_an_existing_split_and_overwrite_leaves_no_stale_split(tmp_path):
    out = tmp_path / "s"
    args = ["digits", "--out", str(out), "--noise", "symmetric:0.4"]
    prepare(build_parser().parse_args(args + ["--val-fraction", "0.1"]))
    with pytest.raises(ValueError, match="already holds split"):
        prepare(build_parser().parse_args(args))
    assert main(args) == 2
    prepare(build_parser().parse_args(args + ["--overwrite"]))  # no val split this time
    manifest = read_manifest(out)
    assert sorted(manifest["splits"]) == ["test", "train"] and not (out / "val").exists()
    assert manifest["splits"]["train"]["count"] == len(ShardDataset(out / "train")) == 1437
    assert not list(out.glob(".prepare-*"))


def test_duplicate_annotation_keys_name_file_and_line(tmp_path):
    make_clothing1m(tmp_path / "raw")
    kv = tmp_path / "raw" / "noisy_label_kv.txt"
    lines = kv.read_text().splitlines()
    write_lines(kv, lines + [lines[2].split()[0] + " 7"])
    with pytest.raises(AnnotationError, match=rf"noisy_label_kv.txt:{len(lines) + 1}: duplicate key .* \(first on line 3\)"):
        read_clothing1m(tmp_path / "raw")
    write_lines(kv, lines)
    keys = tmp_path / "raw" / "clean_val_key_list.txt"
    write_lines(keys, keys.read_text().splitlines() * 2)
    with pytest.raises(AnnotationError, match="clean_val_key_list.txt:7: duplicate key"):
        read_clothing1m(tmp_path / "raw")


def encoded(img: Image.Image, fmt: str) -> Image.Image:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return Image.open(io.BytesIO(buf.getvalue()))


def test_every_pillow_mode_converts_to_the_right_pixels():
    ramp = (np.arange(16, dtype=np.uint32).reshape(4, 4) * 4369).astype(np.uint16)  # 0 .. 65535
    png16 = encoded(Image.fromarray(ramp), "PNG")
    assert png16.mode == "I;16"
    grey = np.asarray(convert_image(png16, "L"))
    assert grey[0, 0] == 0 and grey[3, 3] == 255 and np.all(np.diff(grey.reshape(-1)) > 0)  # not all white
    assert np.array_equal(np.asarray(convert_image(png16, "RGB"))[..., 1], grey)
    assert np.asarray(convert_image(Image.fromarray(ramp.astype(np.int32), "I"), "L"))[3, 3] == 255
    assert np.asarray(convert_image(Image.fromarray(np.full((2, 2), 0.5, np.float32), "F"), "L"))[0, 0] == 128
    clear = Image.new("RGBA", (2, 2), (10, 20, 30, 0))  # fully transparent: the background shows
    assert np.asarray(convert_image(clear, "RGB"))[0, 0].tolist() == [255, 255, 255]
    assert np.asarray(convert_image(Image.new("LA", (2, 2), (0, 255)), "L"))[0, 0] == 0  # opaque black stays black
    palette = Image.new("P", (2, 2), 0)
    palette.putpalette([200, 0, 0] + [0] * 765)
    palette.info["transparency"] = 0
    assert np.asarray(convert_image(encoded(palette, "PNG"), "RGB"))[0, 0].tolist() == [255, 255, 255]
    cmyk = encoded(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG")
    r, g, b = np.asarray(convert_image(cmyk, "RGB"))[4, 4].tolist()
    assert r > 200 and g < 60 and b < 60  # red


def test_atomic_write_keeps_the_old_file_on_a_full_disk_or_a_crash(tmp_path, monkeypatch):
    path = tmp_path / "summary.csv"
    atomic_write_text(path, "epoch\n0\n")

    def full(*_):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("data.atomic.os.fsync", full)
    with pytest.raises(WriteFailed, match=r"cannot write .*summary.csv: No space left on device \(ENOSPC\); its "
                                          "previous content is intact"):
        atomic_write_text(path, "epoch\n0\n1\n")
    monkeypatch.undo()
    assert path.read_text() == "epoch\n0\n" and [p.name for p in tmp_path.iterdir()] == ["summary.csv"]
    monkeypatch.setattr("data.atomic.os.replace", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        atomic_write_text(path, "epoch\n0\n1\n")
    assert path.read_text() == "epoch\n0\n" and [p.name for p in tmp_path.iterdir()] == ["summary.csv"]


def test_manifest_that_is_not_json_is_a_shard_error(tmp_path):
    (tmp_path / "dataset.json").write_text("{ not json")
    with pytest.raises(ShardError, match="not a readable manifest"):
        read_manifest(tmp_path)
    (tmp_path / "dataset.json").write_text(json.dumps({"format_version": 99}))
    with pytest.raises(ShardError, match="format version 99"):
        read_manifest(tmp_path)
