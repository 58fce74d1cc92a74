"""Given labels from outside a data set's own annotations: published human label sets (CIFAR-N) and a
user's CSV of `key,label` rows. Both replace the train split's given labels before anything else
(subset, val split) and record what they did in the manifest.

Nothing here unpickles freely: a CIFAR-N file (`torch.save` of a dict of numpy arrays, zip or legacy
format) is read with the same numpy-only unpickler as the CIFAR archives, and only integer arrays pass.
"""
from __future__ import annotations

import csv
import pickle
import zipfile
from pathlib import Path

import numpy as np

from .noise import noise_summary
from .sources import AnnotationError, Source, _ArrayUnpickler

# --label-set name -> key in the published file (Wei et al., ICLR 2022, github.com/UCSC-REAL/cifar-10-100n)
HUMAN_LABEL_SETS = {
    "cifar10": {"aggre": "aggre_label", "worse": "worse_label", "random1": "random_label1",
                "random2": "random_label2", "random3": "random_label3"},
    "cifar100": {"noisy": "noisy_label"},
}
TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # first pickle of a torch.save file written without zip


def _unpickle(f, path: Path):
    try:
        return _ArrayUnpickler(f, encoding="latin1").load()
    except pickle.UnpicklingError as e:  # a refused global, or torch tensors (persistent ids)
        raise AnnotationError(f"{path}: not a dict of numpy arrays ({e}); expected the published "
                              "CIFAR-N file, a torch.save of numpy integer arrays") from None
    except (EOFError, ValueError, TypeError) as e:
        raise AnnotationError(f"{path}: truncated or not a torch.save file ({e})") from None


def load_label_arrays(path: Path) -> dict[str, np.ndarray]:
    """The dict of arrays in a `torch.save` file (zip or legacy format), without general unpickling."""
    path = Path(path)
    if not path.is_file():
        raise AnnotationError(f"{path}: human label file not found")
    if path.stat().st_size == 0:
        raise AnnotationError(f"{path}: the file is empty (0 bytes); download it again")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith("data.pkl")]
            if not names:
                raise AnnotationError(f"{path}: a zip file without data.pkl; not a torch.save file")
            with archive.open(names[0]) as f:
                obj = _unpickle(f, path)
    else:
        with open(path, "rb") as f:
            if _unpickle(f, path) != TORCH_LEGACY_MAGIC:
                raise AnnotationError(f"{path}: neither a zip nor a legacy torch.save file (wrong magic number)")
            _unpickle(f, path), _unpickle(f, path)  # protocol version, system info
            obj = _unpickle(f, path)
    if not isinstance(obj, dict):
        raise AnnotationError(f"{path}: holds a {type(obj).__name__}; expected a dict of label arrays")
    return obj


def check_label_array(path: Path, key: str, value, count: int, num_classes: int) -> np.ndarray:
    """One array of the file as int64 [count] in 0..num_classes-1, or an error naming what was found."""
    array = np.asarray(value)
    if not np.issubdtype(array.dtype, np.integer):
        raise AnnotationError(f"{path}: {key} holds {array.dtype} values; expected integer class indices")
    if array.shape != (count,):
        raise AnnotationError(f"{path}: {key} has shape {array.shape}; the train split has {count} samples "
                              "(the file must follow the python-version CIFAR order)")
    if count and (array.min() < 0 or array.max() >= num_classes):
        raise AnnotationError(f"{path}: {key} holds labels in {array.min()}..{array.max()}; expected "
                              f"0..{num_classes - 1}")
    return array.astype(np.int64)


def apply_human_labels(source: Source, path: Path, label_set: str) -> dict:
    """Replace the train split's given labels by a CIFAR-N label set; the archive's labels become the true
    labels. The file's `clean_label` must equal the archive's labels (same data set, same order)."""
    sets = HUMAN_LABEL_SETS.get(source.name)
    if sets is None:
        raise ValueError(f"--human-labels: published human labels exist for cifar10 and cifar100, not "
                         f"{source.name}; use --labels-file FILE.csv for other data sets")
    if label_set not in sets:
        raise ValueError(f"--label-set {label_set!r}: {source.name} has {', '.join(sets)}")
    arrays = load_label_arrays(path)
    needed = {"clean_label", sets[label_set]}
    if not needed <= set(arrays):
        raise AnnotationError(f"{path}: keys {sorted(map(str, arrays))}; {source.name}'s label set "
                              f"{label_set} needs {sorted(needed)} (is this the {source.name} file?)")
    records = source.splits["train"]
    count, classes = len(records), len(source.class_names)
    clean = check_label_array(path, "clean_label", arrays["clean_label"], count, classes)
    human = check_label_array(path, sets[label_set], arrays[sets[label_set]], count, classes)
    archive = np.array([r.label for r in records])
    mismatch = np.flatnonzero(clean != archive)
    if len(mismatch):
        raise AnnotationError(f"{path}: clean_label disagrees with the archive's labels at {len(mismatch)} of "
                              f"{count} samples (first at index {mismatch[0]}): another data set or another order")
    for r, c, y in zip(records, clean, human):
        r.true_label, r.label = int(c), int(y)
    return {"noise": {"kind": "human", "file": path.name, "label_set": label_set, "key": sets[label_set],
                      "split": "train", **noise_summary(clean, human, classes)}}


def parse_label(token: str, class_names: list[str], where: str) -> int:
    """A class index or an exact class name."""
    token = token.strip()
    if token.lstrip("-").isdigit():
        value = int(token)
        if not 0 <= value < len(class_names):
            raise AnnotationError(f"{where}: label {value} out of range 0..{len(class_names) - 1}")
        return value
    if token in class_names:
        return class_names.index(token)
    raise AnnotationError(f"{where}: label {token!r} is neither a class index nor a class name")


def read_labels_file(path: Path, keys: list[str], class_names: list[str]) -> dict[int, int]:
    """{train index: label} from CSV rows `key,label` (an optional `key,label` header); a key is a source key
    as the manifest records it, or the sample's index in the source order. Bad rows name file and line."""
    path = Path(path)
    if not path.is_file():
        raise AnnotationError(f"{path}: labels file not found")
    index_of = {k: i for i, k in enumerate(keys)}
    out, line_of = {}, {}
    with open(path, newline="", encoding="utf-8") as f:
        for number, row in enumerate(csv.reader(f), start=1):
            where = f"{path}:{number}"
            if not row or not "".join(row).strip():
                continue
            if len(row) != 2:
                raise AnnotationError(f"{where}: expected 2 fields `key,label`, got {len(row)}")
            key, label = row[0].strip(), row[1]
            if number == 1 and (key, label.strip()) == ("key", "label"):
                continue
            i = index_of.get(key)
            if i is None and key.isdigit() and int(key) < len(keys):
                i = int(key)
            if i is None:
                raise AnnotationError(f"{where}: unknown key {key!r} (neither a train key nor an index "
                                      f"0..{len(keys) - 1})")
            if i in out:
                raise AnnotationError(f"{where}: duplicate: sample {keys[i]!r} already labelled on line {line_of[i]}")
            out[i], line_of[i] = parse_label(label, class_names, where), number
    return out


def apply_labels_file(source: Source, path: Path, replaces: str) -> dict:
    """Replace the given labels of the train samples the CSV names. `replaces clean`: the labels replaced were
    clean, so each becomes the sample's true label; `replaces noisy`: they were not, so those samples' true
    label becomes unknown (-1)."""
    if replaces not in ("noisy", "clean"):
        raise ValueError(f"--labels-file-replaces must be noisy or clean, got {replaces!r}")
    records = source.splits.get("train", [])
    new = read_labels_file(path, [r.key for r in records], source.class_names)
    changed = sum(records[i].label != label for i, label in new.items())
    for i, label in new.items():
        r = records[i]
        r.true_label = r.label if replaces == "clean" else -1
        r.label = label
    true = np.array([r.true_label for r in records])
    given = np.array([r.label for r in records])
    info = {"file": Path(path).name, "rows": len(new), "changed": int(changed), "replaces": replaces,
            "split": "train"}
    return {"labels_file": {**info, **noise_summary(true, given, len(source.class_names))}}
