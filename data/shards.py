"""Writing splits into WebDataset shards, the wids index, the offset table and the manifest.

Shard contract (format version 1), per sample:
  `<key>.<ext>` image bytes as found (re-encoded only when resizing), `<key>.idx` dense sample id,
  `<key>.cls` given label, `<key>.true.cls` true label when known, `<key>.src.txt` source key/path.
Beside the shards: `index.json` (wids shard index) and `offsets.npz` (sample id -> byte range, labels),
which `data.reader` uses for random access; it is derived from the shards and rebuilt when stale.
"""
from __future__ import annotations

import io
import json
import logging
import os
import tarfile
import zlib
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path

import numpy as np

from .atomic import atomic_write, atomic_write_text
from .images import convert_image
from .sources import Record, file_bytes, image_extension

FORMAT_VERSION = 1
MTIME = 0  # fixed member mtime (an int: a float mtime makes tarfile add a PAX header to every member,
#            doubling the shard size and the time to write and index it); the same input gives byte-identical shards
IMAGE_EXTS = ("jpg", "png", "bmp", "webp", "gif", "tiff")
logger = logging.getLogger(__name__)


class ShardError(ValueError):
    """Shards that do not match their manifest (missing, truncated, foreign, mixed); the message says what."""


@dataclass
class Prepared:
    """A record after reading and validating its image: bytes and extension, or a skip reason."""

    record: Record
    data: bytes | None
    ext: str
    error: str | None = None


def check_and_resize(data: bytes, resize: int | None) -> tuple[bytes, str | None]:
    """Decode fully (a truncated file fails here); shrink the shorter side to `resize` if larger."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        img.load()
        if resize is None or min(img.size) <= resize:
            return data, None
        scale = resize / min(img.size)
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        out = io.BytesIO()
        convert_image(img, "RGB").resize(size, Image.BILINEAR).save(out, format="JPEG", quality=90)
        return out.getvalue(), "jpg"


def prepare_record(args: tuple[Record, int | None]) -> Prepared:
    """Read and validate one record (runs in a worker process)."""
    record, resize = args
    ext = image_extension(record)
    try:
        data = file_bytes(record)
    except OSError as e:
        return Prepared(record, None, ext, f"missing: {e.strerror or e}")
    try:
        data, new_ext = check_and_resize(data, resize)
    except Exception as e:  # PIL raises many types for undecodable files
        return Prepared(record, None, ext, f"undecodable: {type(e).__name__}: {e}")
    return Prepared(record, data, new_ext or ext)


def iter_prepared(records: list[Record], resize: int | None, workers: int):
    """Prepared records in input order (order fixes the sample ids)."""
    jobs = ((r, resize) for r in records)
    if workers <= 1:
        yield from map(prepare_record, jobs)
        return
    with Pool(workers) as pool:
        yield from pool.imap(prepare_record, jobs, chunksize=64)


def write_split(records: list[Record], out: Path, *, resize: int | None = None, workers: int = 1,
                maxcount: int = 10000, maxsize: float = 1e9) -> dict:
    """Write one split's shards, index.json and offsets.npz; return its manifest entry."""
    import webdataset as wds

    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("shard-*.tar"):
        old.unlink()
    labels, true_labels, skipped = [], [], []
    pattern = str(out / "shard-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=maxcount, maxsize=maxsize, verbose=0, mtime=MTIME, encoder=False) as sink:
        for item in iter_prepared(records, resize, workers):
            if item.error:
                skipped.append({"key": item.record.key, "reason": item.error})
                continue
            idx = len(labels)
            sample = {"__key__": f"{idx:09d}", item.ext: item.data, "idx": str(idx).encode(),
                      "cls": str(item.record.label).encode(), "src.txt": item.record.key.encode("utf-8")}
            if item.record.true_label >= 0:
                sample["true.cls"] = str(item.record.true_label).encode()
            sink.write(sample)
            labels.append(item.record.label)
            true_labels.append(item.record.true_label)
    shards = sorted(out.glob("shard-*.tar"))
    table = build_offset_table(shards)
    atomic_write(out / "offsets.npz", lambda f: np.savez(f, **table))
    write_wids_index(out, shards, table)
    entry = split_manifest(np.array(labels), np.array(true_labels), skipped, len(records))
    counts = np.bincount(table["shard"], minlength=len(shards))
    entry["shards"] = [{"name": p.name, "size": os.path.getsize(p), "crc32": file_crc32(p), "count": int(c)}
                       for p, c in zip(shards, counts)]
    return entry


def file_crc32(path: Path, chunk: int = 1 << 22) -> int:
    """CRC-32 of a whole file (zlib's; ~1 GB/s)."""
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            crc = zlib.crc32(block, crc)
    return crc


def split_manifest(labels: np.ndarray, true_labels: np.ndarray, skipped: list, total: int) -> dict:
    """Count, label histogram, realised noise rate and skip list of one split."""
    known = true_labels >= 0
    return {
        "count": int(len(labels)),
        "label_histogram": np.bincount(labels).tolist() if len(labels) else [],
        "true_labels_known": int(known.sum()),
        "realised_noise_rate": float((labels[known] != true_labels[known]).mean()) if known.any() else None,
        "skipped": skipped,
        "skipped_fraction": len(skipped) / max(total, 1),
    }


def write_wids_index(out: Path, shards: list[Path], table: dict) -> None:
    """The wids shard index: url (relative to index.json) and nsamples of every shard."""
    counts = np.bincount(table["shard"], minlength=len(shards))
    index = {"__kind__": "wids-shard-index-v1", "wids_version": 1, "name": out.name,
             "shardlist": [{"url": s.name, "nsamples": int(n)} for s, n in zip(shards, counts)]}
    atomic_write_text(out / "index.json", json.dumps(index, indent=1) + "\n")


def build_offset_table(shards: list[Path]) -> dict[str, np.ndarray]:
    """Scan tar headers: per sample id its shard, image byte range and extension, labels, source key.

    Raises ValueError naming the shard when ids are not dense 0..n-1.
    """
    rows: dict[int, dict] = {}
    sizes = []
    for s, path in enumerate(shards):
        sizes.append(os.path.getsize(path))
        with tarfile.open(path, "r:") as tar:
            current: dict = {}
            for member in tar:
                key, _, field = member.name.partition(".")
                if current.get("key") != key:
                    current = {"key": key, "shard": s}
                if field in IMAGE_EXTS:
                    current.update(offset=member.offset_data, size=member.size, ext=IMAGE_EXTS.index(field))
                elif field in ("idx", "cls", "true.cls", "src.txt"):
                    value = tar.extractfile(member).read().decode("utf-8")
                    current[field] = value if field == "src.txt" else int(value)
                if "idx" in current:
                    other = rows.get(current["idx"])
                    if other is not None and other is not current:
                        raise ShardError(f"{path}: sample id {current['idx']} also appears in "
                                         f"{shards[other['shard']].name}: shards of two preparations are mixed; "
                                         "re-run data.prepare into an empty --out")
                    rows[current["idx"]] = current
    n = len(rows)
    if sorted(rows) != list(range(n)):
        raise ShardError(f"{shards[0].parent}: sample ids are not dense 0..{n - 1} (a shard is missing, truncated "
                         "or from another preparation); re-run data.prepare")
    ordered = [rows[i] for i in range(n)]
    return {
        "shard": np.array([r["shard"] for r in ordered], dtype=np.int32),
        "offset": np.array([r.get("offset", -1) for r in ordered], dtype=np.int64),
        "size": np.array([r.get("size", 0) for r in ordered], dtype=np.int64),
        "ext": np.array([r.get("ext", -1) for r in ordered], dtype=np.int8),
        "label": np.array([r["cls"] for r in ordered], dtype=np.int64),
        "true_label": np.array([r.get("true.cls", -1) for r in ordered], dtype=np.int64),
        "source": np.array([r.get("src.txt", "") for r in ordered], dtype=np.str_),
        "shard_names": np.array([p.name for p in shards], dtype=np.str_),
        "shard_sizes": np.array(sizes, dtype=np.int64),
    }


def load_offset_table(split_dir: Path) -> dict[str, np.ndarray]:
    """offsets.npz when it matches the shards on disk, else rebuilt by scanning them."""
    shards = sorted(split_dir.glob("shard-*.tar"))
    if not shards:
        raise ShardError(f"{split_dir}: no shard-*.tar files; run `python -m data.prepare` first")
    cached = split_dir / "offsets.npz"
    if cached.is_file():
        with np.load(cached, allow_pickle=False) as z:
            table = {k: z[k] for k in z.files}
        if (list(table["shard_names"]) == [p.name for p in shards]
                and list(table["shard_sizes"]) == [os.path.getsize(p) for p in shards]):
            return table
        logger.warning("%s is stale (shards changed); rebuilding the offset table", cached)
    return build_offset_table(shards)


def write_manifest(out: Path, name: str, class_names: list[str], splits: dict[str, dict], extra: dict,
                   replaced: list[str] = ()) -> None:
    """`dataset.json`: merged with an existing manifest so splits can be prepared separately; the entries of
    `replaced` splits are dropped first (a manifest left with none starts afresh)."""
    path = out / "dataset.json"
    manifest = json.loads(path.read_text()) if path.is_file() else {}
    if replaced:
        kept = {k: v for k, v in manifest.get("splits", {}).items() if k not in replaced}
        manifest = {**manifest, "splits": kept} if kept else {}
    if manifest.get("num_classes", len(class_names)) != len(class_names):
        raise ValueError(f"{path}: holds {manifest['num_classes']} classes, these splits {len(class_names)}; "
                         "use --num-classes to match or another --out")
    manifest.setdefault("name", name)  # ilsvrc12_val prepared into a WebVision folder keeps its name
    manifest.update({"format_version": FORMAT_VERSION, "num_classes": len(class_names),
                     "class_names": manifest.get("class_names", class_names), **extra})
    manifest.setdefault("splits", {}).update({k: {"source": name, **v} for k, v in splits.items()})
    atomic_write_text(path, json.dumps(manifest, indent=1) + "\n")


def read_manifest(root: Path) -> dict:
    """Read `dataset.json` of a prepared data set folder."""
    path = Path(root) / "dataset.json"
    if not path.is_file():
        raise ShardError(f"{path} not found; prepare the data set with `python -m data.prepare`")
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, OSError) as e:
        raise ShardError(f"{path}: not a readable manifest ({e}); re-run data.prepare") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        raise ShardError(f"{path}: shard format version {manifest.get('format_version') if isinstance(manifest, dict) else None} "
                         f"!= {FORMAT_VERSION}; re-run data.prepare")
    return manifest


def verify_split(split_dir: Path, entry: dict, num_classes: int, crc: bool = False) -> dict:
    """Check a split's shards against its manifest entry before training: the shard files listed there (sizes,
    and CRC-32 with `crc`), its sample count, ids dense, labels in 0..C-1 and the label histogram. Returns the
    offset table; raises ShardError naming the split and what to do."""
    split_dir = Path(split_dir)
    listed = entry.get("shards")  # manifests written before shard lists existed carry none
    if listed is not None:
        on_disk = {p.name: p for p in split_dir.glob("shard-*.tar")}
        names = [s["name"] for s in listed]
        if missing := [n for n in names if n not in on_disk]:
            raise ShardError(f"{split_dir}: shard {missing[0]} listed in dataset.json is missing; re-run data.prepare")
        if extra := sorted(set(on_disk) - set(names)):
            raise ShardError(f"{split_dir}: shard {extra[0]} is not in dataset.json (a foreign or left-over file); "
                             "remove it or re-run data.prepare")
        for s in listed:
            size = os.path.getsize(on_disk[s["name"]])
            if size != s["size"]:
                raise ShardError(f"{split_dir / s['name']}: {size} bytes, dataset.json says {s['size']} (truncated "
                                 "or replaced); re-run data.prepare")
            if crc and file_crc32(on_disk[s["name"]]) != s["crc32"]:
                raise ShardError(f"{split_dir / s['name']}: CRC-32 differs from dataset.json (damaged or replaced); "
                                 "re-run data.prepare")
    table = load_offset_table(split_dir)
    n = len(table["label"])
    if n != entry.get("count", n):
        raise ShardError(f"{split_dir}: {n} samples in the shards, dataset.json says {entry['count']}; re-run "
                         "data.prepare")
    labels = table["label"]
    if n and (labels.min() < 0 or labels.max() >= num_classes):
        bad = int(np.flatnonzero((labels < 0) | (labels >= num_classes))[0])
        raise ShardError(f"{split_dir}: sample id {bad} has label {int(labels[bad])}, outside 0..{num_classes - 1} "
                         f"(shard {table['shard_names'][table['shard'][bad]]}); re-run data.prepare")
    histogram = entry.get("label_histogram")
    if histogram is not None and np.bincount(labels).tolist() != list(histogram):
        raise ShardError(f"{split_dir}: the labels in the shards do not match dataset.json's label histogram "
                         "(shards of another preparation); re-run data.prepare")
    return table
