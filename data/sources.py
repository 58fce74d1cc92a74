"""Readers of the real on-disk layouts of each data set (see DATASETS.md).

Each reader returns a `Source`: class names plus, per split, a list of `Record`s in a fixed order.
Nothing here decodes images; `data.shards` does that while writing.
"""
from __future__ import annotations

import io
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


class AnnotationError(ValueError):
    """A malformed or missing annotation: the message names the file, the line and the fix."""


@dataclass
class Record:
    """One sample before it is written: a file path or encoded bytes, its given and true label."""

    key: str  # source key or path, as the data set names it
    label: int
    true_label: int = -1  # -1 when unknown
    path: str | None = None  # absolute file to read the image bytes from
    image: bytes | None = None  # encoded image bytes (in-memory data sets)
    group: int = -1  # super-class (CIFAR-100), used by asymmetric noise


@dataclass
class Source:
    """A data set as read from disk: class names and the records of each split."""

    name: str
    class_names: list[str]
    splits: dict[str, list[Record]] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # written into the manifest


# ----------------------------------------------------------------------------- text files

def read_lines(path: Path) -> list[tuple[int, list[str]]]:
    """(line number, whitespace tokens) of every non-empty line; CRLF and trailing blanks tolerated."""
    if not path.is_file():
        raise AnnotationError(f"{path}: annotation file not found; check --root points at the data set")
    out = []
    with open(path, encoding="utf-8", errors="strict") as f:
        for number, line in enumerate(f, start=1):
            tokens = line.split()  # whitespace only: Clothing1M file names contain commas
            if tokens:
                out.append((number, tokens))
    return out


def parse_int_label(path: Path, number: int, token: str, num_classes: int | None) -> int:
    """Parse one label token, or fail naming file and line."""
    try:
        label = int(token)
    except ValueError:
        raise AnnotationError(f"{path}:{number}: label {token!r} is not an integer") from None
    if label < 0 or (num_classes is not None and label >= num_classes):
        raise AnnotationError(
            f"{path}:{number}: label {label} out of range 0..{num_classes - 1 if num_classes else '?'}; "
            "is this the right annotation file for this data set?")
    return label


def note_first_line(line_of: dict[str, int], key: str, path: Path, number: int, what: str, why: str) -> None:
    """Remember the line `key` is on; a key seen before is an error naming both lines."""
    if key in line_of:
        raise AnnotationError(f"{path}:{number}: duplicate {what} {key!r} (first on line {line_of[key]}); {why}")
    line_of[key] = number


def read_key_label(path: Path, num_classes: int | None) -> dict[str, int]:
    """`<key> <label>` lines -> {key: label}; a line with another shape is an error."""
    table, line_of = {}, {}
    for number, tokens in read_lines(path):
        if len(tokens) != 2:
            raise AnnotationError(
                f"{path}:{number}: expected '<key> <label>' (2 fields split on whitespace), got {len(tokens)}")
        note_first_line(line_of, tokens[0], path, number, "key", "each key may have one label")
        table[tokens[0]] = parse_int_label(path, number, tokens[1], num_classes)
    return table


def read_key_list(path: Path) -> list[tuple[int, str]]:
    """One key per line -> [(line number, key)]."""
    out, line_of = [], {}
    for number, tokens in read_lines(path):
        if len(tokens) != 1:
            raise AnnotationError(f"{path}:{number}: expected one key per line, got {len(tokens)} fields")
        note_first_line(line_of, tokens[0], path, number, "key", "a sample listed twice would be trained twice")
        out.append((number, tokens[0]))
    return out


# ----------------------------------------------------------------------------- Clothing1M

CLOTHING1M_SPLITS = {"train": "noisy_train_key_list.txt", "val": "clean_val_key_list.txt",
                     "test": "clean_test_key_list.txt"}


def find_annotation_dir(root: Path, marker: str) -> Path:
    """The folder holding the annotation txt files: the root itself or `root/annotations`."""
    for folder in (root, root / "annotations"):
        if (folder / marker).is_file():
            return folder
    raise AnnotationError(f"{root / marker}: not found (also looked in {root / 'annotations'}); "
                          "point --root at the Clothing1M folder")


def clothing1m_image_path(root: Path, key: str) -> str:
    """Keys start with `images/`; some users unpack the folders 0..9 directly beside the txt files."""
    direct = root / key
    if direct.exists() or not key.startswith("images/"):
        return str(direct)
    return str(root / key[len("images/"):])


def read_clothing1m(root: Path, splits=("train", "val", "test")) -> Source:
    """Clothing1M: noisy train (true label where a clean one exists), clean val and test."""
    ann = find_annotation_dir(root, "noisy_label_kv.txt")
    names = [" ".join(t) for _, t in read_lines(ann / "category_names_eng.txt")]
    if len(names) != 14:
        raise AnnotationError(f"{ann / 'category_names_eng.txt'}: expected 14 class names, found {len(names)}")
    noisy = read_key_label(ann / "noisy_label_kv.txt", 14)
    clean = read_key_label(ann / "clean_label_kv.txt", 14)
    source = Source("clothing1m", names)
    for split in splits:
        list_file = ann / CLOTHING1M_SPLITS[split]
        labels = noisy if split == "train" else clean
        label_file = "noisy_label_kv.txt" if split == "train" else "clean_label_kv.txt"
        records = []
        for number, key in read_key_list(list_file):
            if key not in labels:
                raise AnnotationError(f"{list_file}:{number}: key {key!r} has no label in {ann / label_file}")
            records.append(Record(key, labels[key], clean.get(key, -1) if split == "train" else labels[key],
                                  path=clothing1m_image_path(root, key)))
        source.splits[split] = records
    return source


# ----------------------------------------------------------------------------- WebVision / ILSVRC12

def read_synsets(path: Path) -> tuple[list[str], list[str]]:
    """`info/synsets.txt` -> (wnids, class names); line c is class c."""
    wnids, names = [], []
    for number, tokens in read_lines(path):
        if not re.fullmatch(r"n\d{8}", tokens[0]):
            raise AnnotationError(f"{path}:{number}: expected '<wnid> <words>', got {tokens[0]!r}")
        wnids.append(tokens[0])
        names.append(" ".join(tokens[1:]) or tokens[0])
    return wnids, names


def read_file_list(path: Path, num_classes: int) -> list[tuple[int, str, int]]:
    """`<relative path> <label>` lines -> [(line, path, label)] keeping labels < num_classes."""
    out, line_of = [], {}
    for number, tokens in read_lines(path):
        if len(tokens) != 2:
            raise AnnotationError(f"{path}:{number}: expected '<path> <label>', got {len(tokens)} fields")
        note_first_line(line_of, tokens[0], path, number, "path", "each image may be listed once")
        label = parse_int_label(path, number, tokens[1], None)
        if label < num_classes:
            out.append((number, tokens[0], label))
    return out


def first_existing(*paths: Path) -> Path:
    """The first path that exists (else the first, so errors name the expected place)."""
    return next((p for p in paths if p.exists()), paths[0])


def read_webvision(root: Path, subset: str = "mini", sources=("google",), num_classes: int | None = None,
                   splits=("train", "val")) -> Source:
    """WebVision 1.0: `mini` = first 50 classes of the Google list, `full` = all 1000 classes."""
    if subset not in ("mini", "full"):
        raise ValueError(f"--subset must be mini or full, got {subset!r}")
    num_classes = num_classes or (50 if subset == "mini" else 1000)
    if subset == "mini":
        sources = ("google",)
    wnids, names = read_synsets(root / "info" / "synsets.txt")
    source = Source(f"webvision-{subset}", names[:num_classes], extra={"wnids": wnids[:num_classes]})
    if "train" in splits:
        records = []
        for src in sources:
            for _, rel, label in read_file_list(root / "info" / f"train_filelist_{src}.txt", num_classes):
                records.append(Record(rel, label, path=str(root / rel)))
        source.splits["train"] = records
    if "val" in splits:
        folder = first_existing(root / "val_images_256", root / "val_images")
        source.splits["val"] = [Record(rel, label, label, path=str(folder / rel)) for _, rel, label
                                in read_file_list(root / "info" / "val_filelist.txt", num_classes)]
    return source


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


def list_images(folder: Path) -> list[Path]:
    """Image files of one folder, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def ilsvrc_ground_truth_wnids(root: Path, devkit: Path | None) -> dict[str, str]:
    """Devkit layout: ground-truth ILSVRC2012_IDs (file-number order) mapped to wnids via meta.mat."""
    from scipy.io import loadmat  # only this layout needs it

    candidates = [devkit] if devkit else [root, root.parent, root.parent / "ILSVRC2012_devkit_t12" / "data"]
    folder = next((c for c in candidates if (c / "ILSVRC2012_validation_ground_truth.txt").is_file()), None)
    if folder is None:
        raise AnnotationError(f"{root}: flat folder without labels; give --solution LOC_val_solution.csv "
                              "or --devkit DIR holding ILSVRC2012_validation_ground_truth.txt and meta.mat")
    meta = loadmat(str(folder / "meta.mat"), squeeze_me=True)["synsets"]
    id_to_wnid = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in meta}
    gt_file = folder / "ILSVRC2012_validation_ground_truth.txt"
    out = {}
    for i, (number, tokens) in enumerate(read_lines(gt_file), start=1):
        ilsvrc_id = parse_int_label(gt_file, number, tokens[0], None)
        if ilsvrc_id not in id_to_wnid:
            raise AnnotationError(f"{gt_file}:{number}: ILSVRC2012_ID {ilsvrc_id} is not in {folder / 'meta.mat'}")
        out[f"ILSVRC2012_val_{i:08d}"] = id_to_wnid[ilsvrc_id]  # IDs are NOT sorted-wnid order
    return out


def loc_solution_wnids(path: Path) -> dict[str, str]:
    """`LOC_val_solution.csv`: ImageId -> first wnid of PredictionString."""
    out, line_of = {}, {}
    for number, tokens in read_lines(path):
        if number == 1 and tokens[0].startswith("ImageId"):
            continue
        image_id, _, rest = " ".join(tokens).partition(",")
        if not rest or not re.match(r"n\d{8}", rest):
            raise AnnotationError(f"{path}:{number}: expected 'ImageId,<wnid> x y x y ...'")
        note_first_line(line_of, image_id, path, number, "ImageId", "each image has one label")
        out[image_id] = rest.split()[0]
    return out


def val_folder(root: Path) -> Path:
    """The folder of the val images: `root` itself, or `root/val` when given the ImageNet root (as
    torchvision's `ImageNet(root, split="val")` takes it); LOC_val_solution.csv is then found at the root."""
    own = any(p.suffix.lower() in IMAGE_SUFFIXES for p in root.iterdir()) or any(
        d.is_dir() and re.fullmatch(r"n\d{8}", d.name) for d in root.iterdir())
    return root / "val" if not own and (root / "val").is_dir() else root


def read_ilsvrc12_val(root: Path, synsets: Path, num_classes: int = 1000, solution: Path | None = None,
                      devkit: Path | None = None) -> Source:
    """ILSVRC12 val in any of its three layouts, labelled with WebVision class ids (synsets line c)."""
    wnids, names = read_synsets(synsets)
    class_of = {w: c for c, w in enumerate(wnids[:num_classes])}
    root = val_folder(root)
    wnid_dirs = [d for d in sorted(root.iterdir()) if d.is_dir() and re.fullmatch(r"n\d{8}", d.name)]
    if wnid_dirs:
        layout = "wnid-folders"
        pairs = [(p, d.name) for d in wnid_dirs for p in list_images(d)]
    else:
        solution = solution or next((c for c in (root / "LOC_val_solution.csv", root.parent / "LOC_val_solution.csv")
                                     if c.is_file()), None)
        layout = "loc-solution" if solution else "devkit"
        by_id = loc_solution_wnids(solution) if solution else ilsvrc_ground_truth_wnids(root, devkit)
        pairs = []
        for p in list_images(root):
            if p.stem not in by_id:
                raise AnnotationError(f"{p}: no label for {p.stem} in the {layout} annotations")
            pairs.append((p, by_id[p.stem]))
    records = [Record(str(p.relative_to(root)), class_of[w], class_of[w], path=str(p))
               for p, w in pairs if w in class_of]
    return Source("ilsvrc12-val", names[:num_classes], {"ilsvrc12_val": records},
                  extra={"layout": layout, "wnids": wnids[:num_classes]})


# ----------------------------------------------------------------------------- CIFAR, folders, digits

class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler for the CIFAR archives that refuses every global but numpy's array rebuilders."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
               ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR archive")
        return super().find_class(module, name)


def load_cifar_batch(path: Path) -> dict:
    """One CIFAR python-version batch file (read at preparation time only, from the user's path)."""
    if not path.is_file():
        raise AnnotationError(f"{path}: CIFAR batch file not found; point --root at the extracted archive folder")
    with open(path, "rb") as f:
        raw = _ArrayUnpickler(f, encoding="bytes").load()
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in raw.items()}


def encode_png(array: np.ndarray) -> bytes:
    """HWC or HW uint8 array -> PNG bytes (deterministic)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def cifar_records(batch: dict, label_key: str, prefix: str) -> list[Record]:
    """Records from one CIFAR batch dict: channel-planar rows -> PNG bytes."""
    data = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    labels = [int(v) for v in batch[label_key]]
    groups = [int(v) for v in batch.get("coarse_labels", [-1] * len(labels))]
    return [Record(f"{prefix}/{i}", labels[i], labels[i], image=encode_png(data[i]), group=groups[i])
            for i in range(len(labels))]


def read_cifar(root: Path, num_classes: int) -> Source:
    """CIFAR-10 (`cifar-10-batches-py`) or CIFAR-100 (`cifar-100-python`) from the python archives."""
    if num_classes == 10:
        folder = first_existing(root / "cifar-10-batches-py", root)
        meta = load_cifar_batch(folder / "batches.meta")
        names = [n.decode() if isinstance(n, bytes) else n for n in meta["label_names"]]
        train = []
        for i in range(1, 6):
            train += cifar_records(load_cifar_batch(folder / f"data_batch_{i}"), "labels", f"data_batch_{i}")
        test = cifar_records(load_cifar_batch(folder / "test_batch"), "labels", "test_batch")
    else:
        folder = first_existing(root / "cifar-100-python", root)
        meta = load_cifar_batch(folder / "meta")
        names = [n.decode() if isinstance(n, bytes) else n for n in meta["fine_label_names"]]
        train = cifar_records(load_cifar_batch(folder / "train"), "fine_labels", "train")
        test = cifar_records(load_cifar_batch(folder / "test"), "fine_labels", "test")
    return Source(f"cifar{num_classes}", names, {"train": train, "test": test})


# ----------------------------------------------------------------------------- MNIST-format IDX files

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot"]
IDX_MAGIC = {"images": 0x00000803, "labels": 0x00000801}  # unsigned byte, 3 dims / 1 dim


def idx_file(root: Path, stem: str) -> Path:
    """`root/stem` or `root/stem.gz` (the Debian package and the original site ship the .gz)."""
    for path in (root / stem, root / f"{stem}.gz"):
        if path.is_file():
            return path
    raise AnnotationError(f"{root / stem}[.gz]: not found; point --root at the folder holding the four IDX files "
                          "(Debian: apt-get install dataset-fashion-mnist -> /usr/share/datasets/fashion-mnist)")


def read_idx(path: Path, kind: str) -> np.ndarray:
    """One IDX file (gzip or not) as uint8 [n, 28, 28] images or [n] labels; checks magic and size."""
    import gzip

    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # a truncated .gz fails while inflating
        raise AnnotationError(f"{path}: cannot read ({type(e).__name__}: {e}); the file is damaged or truncated") from None
    ndim = 3 if kind == "images" else 1
    if len(raw) < 4 + 4 * ndim:
        raise AnnotationError(f"{path}: {len(raw)} bytes is too short for an IDX {kind} header")
    magic = int.from_bytes(raw[:4], "big")
    if magic != IDX_MAGIC[kind]:
        raise AnnotationError(f"{path}: magic number {magic:#010x}, expected {IDX_MAGIC[kind]:#010x} for IDX "
                              f"{kind}; is this the right file?")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    body = raw[4 + 4 * ndim:]
    expected = int(np.prod(dims))
    if len(body) != expected:
        raise AnnotationError(f"{path}: header says {' x '.join(map(str, dims))} = {expected} bytes of data, "
                              f"found {len(body)}; the file is truncated or damaged")
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)


def read_idx_split(root: Path, prefix: str, num_classes: int) -> list[Record]:
    """`<prefix>-images-idx3-ubyte` + `<prefix>-labels-idx1-ubyte` -> PNG records keyed `<prefix>/<index>`."""
    images = read_idx(idx_file(root, f"{prefix}-images-idx3-ubyte"), "images")
    label_path = idx_file(root, f"{prefix}-labels-idx1-ubyte")
    labels = read_idx(label_path, "labels")
    if len(images) != len(labels):
        raise AnnotationError(f"{label_path}: {len(labels)} labels for {len(images)} images in "
                              f"{prefix}-images-idx3-ubyte")
    if len(labels) and labels.max() >= num_classes:
        raise AnnotationError(f"{label_path}: label {int(labels.max())} out of range 0..{num_classes - 1}")
    return [Record(f"{prefix}/{i}", int(y), int(y), image=encode_png(images[i])) for i, y in enumerate(labels)]


def read_mnist_format(root: Path, name: str) -> Source:
    """Fashion-MNIST or MNIST from the four standard IDX files: train (60,000) and test (t10k, 10,000)."""
    names = FASHION_MNIST_CLASSES if name == "fashion-mnist" else [str(c) for c in range(10)]
    return Source(name, names, {"train": read_idx_split(root, "train", 10), "test": read_idx_split(root, "t10k", 10)})


def read_folder(root: Path, split: str = "train") -> Source:
    """Generic ImageFolder: `root/<class name>/<image>`; classes in sorted order."""
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise AnnotationError(f"{root}: no class folders found; expected {root}/<class name>/<image files>")
    records = [Record(f"{c}/{p.name}", i, -1, path=str(p)) for i, c in enumerate(classes)
               for p in list_images(root / c)]
    return Source(root.name or "folder", classes, {split: records})


def read_digits(test_fraction: float = 0.2) -> Source:
    """scikit-learn's digits (8x8, ships with the package), fixed stratified train/test split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # [1797, 8, 8]
    order = np.arange(len(images))
    train_ids, test_ids = train_test_split(order, test_size=test_fraction, stratify=digits.target, random_state=0)
    splits = {name: [Record(f"digits/{i}", int(digits.target[i]), int(digits.target[i]), image=encode_png(images[i]))
                     for i in sorted(ids)] for name, ids in (("train", train_ids), ("test", test_ids))}
    return Source("digits", [str(c) for c in range(10)], splits)


def file_bytes(record: Record) -> bytes:
    """The encoded image bytes of a record (raises OSError when the file is missing)."""
    if record.image is not None:
        return record.image
    with open(record.path, "rb") as f:
        return f.read()


def image_extension(record: Record) -> str:
    """Shard field name for the image: the source file's suffix (`jpeg` -> `jpg`)."""
    if record.image is not None:
        return "png"
    ext = os.path.splitext(record.path)[1].lower().lstrip(".") or "jpg"
    return {"jpeg": "jpg", "tif": "tiff"}.get(ext, ext)
