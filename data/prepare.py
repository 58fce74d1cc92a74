"""`python -m data.prepare <dataset> --root RAW --out SHARDS [options]`: real data sets -> shards.

Data sets: clothing1m, webvision, ilsvrc12-val, cifar10, cifar100, fashion-mnist, mnist, folder,
digits (needs no --root).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from . import labels, sources
from .atomic import WriteFailed, atomic_write_text
from .noise import apply_noise, noise_summary, parse_noise
from .shards import ShardError, write_manifest, write_split

logger = logging.getLogger("data.prepare")
DATASETS = ("clothing1m", "webvision", "ilsvrc12-val", "cifar10", "cifar100", "fashion-mnist", "mnist", "folder",
            "digits")
INSTANCE_SIDE = 32  # instance noise projects pixels of images resized to at most this side


EMPTY_HINTS = {
    "ilsvrc12-val": "--root must hold the 50,000 val images (wnid folders, or flat with LOC_val_solution.csv or "
                    "--devkit), or be the ImageNet root with val/ inside; --num-classes/--synsets keep only "
                    "the WebVision classes",
    "folder": "--root must hold <class name>/<image files>",
}


class TooManySkipped(RuntimeError):
    """More images were missing or undecodable than --max-skip-fraction allows."""


def read_source(args) -> sources.Source:
    """Dispatch to the reader of the chosen data set's on-disk layout."""
    if args.dataset == "digits":
        return sources.read_digits()
    if args.root is None:
        raise ValueError(f"data.prepare {args.dataset}: --root RAW is required")
    root = Path(args.root)
    if not root.is_dir():
        raise ValueError(f"data.prepare {args.dataset}: --root {root} is not a folder")
    splits = tuple(args.splits.split(",")) if args.splits else None
    if args.dataset == "clothing1m":
        return sources.read_clothing1m(root, splits or ("train", "val", "test"))
    if args.dataset == "webvision":
        return sources.read_webvision(root, args.subset, tuple(args.sources.split(",")), args.num_classes,
                                      splits or ("train", "val"))
    if args.dataset == "ilsvrc12-val":
        if not args.synsets:
            raise ValueError("data.prepare ilsvrc12-val: --synsets WEBVISION/info/synsets.txt is required")
        return sources.read_ilsvrc12_val(root, Path(args.synsets), args.num_classes or 1000,
                                         Path(args.solution) if args.solution else None,
                                         Path(args.devkit) if args.devkit else None)
    if args.dataset in ("cifar10", "cifar100"):
        return sources.read_cifar(root, 10 if args.dataset == "cifar10" else 100)
    if args.dataset in ("fashion-mnist", "mnist"):
        return sources.read_mnist_format(root, args.dataset)
    return sources.read_folder(root, args.folder_split)


def instance_features(records: list[sources.Record]) -> np.ndarray:
    """[n, d] normalised pixels for instance-dependent noise: every image decoded in the first image's mode
    (L or RGB) at the first image's size (or INSTANCE_SIDE square when that is larger), scaled to [0, 1]
    and standardised per channel over the split."""
    import io

    from PIL import Image

    from .images import convert_image

    def load(r, mode=None):
        with Image.open(io.BytesIO(sources.file_bytes(r))) as img:
            return convert_image(img, mode or ("L" if img.mode in ("L", "1", "I", "F") or img.mode.startswith("I;")
                                               else "RGB"))

    first = load(records[0])
    mode = first.mode
    size = first.size if max(first.size) <= INSTANCE_SIDE else (INSTANCE_SIDE, INSTANCE_SIDE)
    channels = 1 if mode == "L" else 3
    pixels = np.empty((len(records), size[0] * size[1], channels), dtype=np.float32)
    for i, r in enumerate(records):
        img = load(r, mode)
        if img.size != size:
            img = img.resize(size, Image.BILINEAR)
        pixels[i] = np.asarray(img, dtype=np.float32).reshape(-1, channels) / 255.0
    mean, std = pixels.mean((0, 1)), pixels.std((0, 1)) + 1e-6
    return ((pixels - mean) / std).reshape(len(records), -1)


def add_noise(source: sources.Source, spec_text: str | None, seed: int) -> dict:
    """Corrupt the train split's given labels in place; the clean label becomes the true label."""
    spec = parse_noise(spec_text)
    if spec is None or "train" not in source.splits:
        return {"noise": None}
    records = source.splits["train"]
    clean = np.array([r.label for r in records])
    groups = np.array([r.group for r in records])
    features = instance_features(records) if spec.kind == "instance" else None
    noisy = apply_noise(clean, len(source.class_names), spec, seed, source.name, groups, features)
    for r, c, y in zip(records, clean, noisy):
        r.true_label, r.label = int(c), int(y)
    return {"noise": {"spec": str(spec), "seed": seed, "split": "train",
                      **noise_summary(clean, noisy, len(source.class_names))}}


def stratified_mask(labels: np.ndarray, count_of, rng: np.random.Generator) -> np.ndarray:
    """[n] bool: in each class (in label order) `count_of(class size)` members drawn at random."""
    picked = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        picked[members[:count_of(len(members))]] = True
    return picked


def subsample_train(source: sources.Source, size: int, seed: int) -> dict:
    """Keep a stratified random `size` of the train split (before noise), in source order; for quick studies."""
    if not size:
        return {}
    records = source.splits.get("train", [])
    if not 0 < size < len(records):
        raise ValueError(f"--train-subset {size}: needs 0 < N < {len(records)} (the train split's size)")
    labels = np.array([r.label for r in records])
    keep = stratified_mask(labels, lambda n: int(round(size * n / len(records))), np.random.default_rng([seed, 13]))
    source.splits["train"] = [r for r, k in zip(records, keep) if k]
    return {"train_subset": {"size": int(keep.sum()), "of": len(records), "seed": seed}}


def carve_val(source: sources.Source, fraction: float, seed: int) -> dict:
    """Move a split `val`, stratified by the given (noisy) label, out of train: it keeps its noisy labels
    (a user has no clean ones) and its true labels (for metrics). Deterministic in `seed`."""
    if not fraction:
        return {}
    if not 0 < fraction < 1 or "train" not in source.splits:
        raise ValueError(f"--val-fraction {fraction}: needs 0 < F < 1 and a train split")
    if "val" in source.splits:
        raise ValueError(f"--val-fraction: {source.name} already has a val split")
    records = source.splits["train"]
    labels = np.array([r.label for r in records])
    val = stratified_mask(labels, lambda n: int(round(fraction * n)), np.random.default_rng([seed, 11]))
    source.splits["train"] = [r for r, v in zip(records, val) if not v]
    source.splits["val"] = [r for r, v in zip(records, val) if v]
    return {"val_split": {"fraction": fraction, "seed": seed, "from": "train", "stratified_by": "given label"}}


def replace_labels(source: sources.Source, args) -> dict:
    """Given labels from outside the data set's annotations (--human-labels or --labels-file), in source order."""
    chosen = [name for name, value in (("--noise", args.noise), ("--human-labels", args.human_labels),
                                       ("--labels-file", args.labels_file)) if value and value != "none"]
    if len(chosen) > 1:
        raise ValueError(f"{' and '.join(chosen)}: choose one source of noisy labels")
    if args.human_labels:
        if not args.label_set:
            raise ValueError("--human-labels needs --label-set (cifar10: aggre, worse, random1, random2, random3; "
                             "cifar100: noisy)")
        return labels.apply_human_labels(source, Path(args.human_labels), args.label_set)
    if args.label_set:
        raise ValueError("--label-set is only used with --human-labels FILE")
    if args.labels_file:
        return labels.apply_labels_file(source, Path(args.labels_file), args.labels_file_replaces)
    return {}


def claim_out(out: Path, name: str, splits: list[str], overwrite: bool) -> list[str]:
    """The splits already in `out` that this preparation replaces. Writing a split that exists is refused
    unless `overwrite`, which replaces every split of the same data set (no stale val split is left beside a
    re-written train split); splits of another data set (ILSVRC12 val beside WebVision) are kept."""
    manifest_path = out / "dataset.json"
    existing = json.loads(manifest_path.read_text()).get("splits", {}) if manifest_path.is_file() else {}
    orphans = [p.name for p in out.glob("*") if p.is_dir() and any(p.glob("shard-*.tar")) and p.name not in existing]
    clash = sorted(set(splits) & (set(existing) | set(orphans)))
    if clash and not overwrite:
        raise ValueError(f"--out {out} already holds split(s) {', '.join(clash)}; pass --overwrite to replace the "
                         f"prepared {name} data there, or choose another --out")
    if not overwrite:
        return []
    return sorted(set(clash) | {s for s, e in existing.items() if e.get("source") == name} | set(orphans))


def install_splits(out: Path, staging: Path, written: list[str], replaced: list[str]) -> None:
    """Move the staged splits into `out` (each one a rename), the replaced ones out of the way first."""
    old = staging / ".replaced"
    old.mkdir(exist_ok=True)
    for split in replaced:
        if (out / split).exists():
            os.replace(out / split, old / split)
    for split in written:
        os.replace(staging / split, out / split)


def prepare(args) -> dict:
    """Read, optionally relabel or corrupt, and write every split; returns the per-split manifest entries.

    Splits are written into a staging folder inside `--out` and renamed into place when all are written, and
    `dataset.json` is replaced last, so an interrupted preparation leaves the previous data set as it was."""
    source = read_source(args)
    replaced = replace_labels(source, args)
    subset = subsample_train(source, args.train_subset, args.seed)
    extra = {**source.extra, **subset, **add_noise(source, args.noise, args.seed), **replaced}
    extra.update(carve_val(source, args.val_fraction, args.seed))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".prepare-*"):  # a killed preparation's staging folder
        shutil.rmtree(stale, ignore_errors=True)
    to_replace = claim_out(out, source.name, list(source.splits), args.overwrite)
    staging = Path(tempfile.mkdtemp(prefix=".prepare-", dir=out))
    try:
        results = write_splits(source, args, staging)
        install_splits(out, staging, list(results), to_replace)
        write_manifest(out, source.name, source.class_names, results, extra, replaced=to_replace)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return results


def write_splits(source: sources.Source, args, staging: Path) -> dict:
    """Every split's shards into `staging/<split>`; their manifest entries."""
    results = {}
    for split, records in source.splits.items():
        if not records:
            raise sources.AnnotationError(f"{source.name}: split {split!r} would be written with 0 samples "
                                          f"(looked in {args.root or 'the built-in set'}); {EMPTY_HINTS.get(args.dataset, 'check --root')}")
        entry = write_split(records, staging / split, resize=args.resize, workers=args.workers,
                            maxcount=args.shard_size)
        results[split] = entry
        logger.info("%s/%s: %d samples written, %d skipped (%.2f%%), realised noise %s", source.name, split,
                    entry["count"], len(entry["skipped"]), 100 * entry["skipped_fraction"],
                    entry["realised_noise_rate"])
        for item in entry["skipped"][:10]:
            logger.info("  skipped %s: %s", item["key"], item["reason"])
        if entry["skipped_fraction"] > args.max_skip_fraction:
            report = Path(args.out) / f"skipped-{split}.json"
            atomic_write_text(report, json.dumps(entry["skipped"], indent=1) + "\n")
            raise TooManySkipped(f"{split}: {len(entry['skipped'])} of {len(records)} images skipped "
                                 f"(> --max-skip-fraction {args.max_skip_fraction}); nothing was written; the "
                                 f"skipped images and reasons are in {report}")
    return results


def build_parser() -> argparse.ArgumentParser:
    """Command-line options of data.prepare."""
    p = argparse.ArgumentParser(prog="python -m data.prepare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", choices=DATASETS)
    p.add_argument("--root", help="the data set's folder as downloaded (not needed for digits)")
    p.add_argument("--out", required=True, help="output folder: OUT/<split>/shard-*.tar + OUT/dataset.json")
    p.add_argument("--noise", help="synthetic noise on train: symmetric:R | asymmetric:R | pairflip:R | instance:R")
    p.add_argument("--human-labels", help="cifar10/cifar100: a published CIFAR-N label file (CIFAR-10_human.pt, "
                   "CIFAR-100_human.pt); its --label-set becomes the given labels, the archive's the true labels")
    p.add_argument("--label-set", help="with --human-labels: cifar10 aggre | worse | random1 | random2 | random3; "
                   "cifar100 noisy")
    p.add_argument("--labels-file", help="CSV of `key,label` rows (key: the source key or the train index; label: "
                   "class index or name) replacing those train samples' given labels")
    p.add_argument("--labels-file-replaces", default="noisy", choices=("noisy", "clean"),
                   help="clean: the labels replaced were right, keep them as true labels; noisy (default): they "
                   "were not, the true label of those samples is unknown")
    p.add_argument("--seed", type=int, default=0, help="noise (and val split) seed")
    p.add_argument("--val-fraction", type=float, default=0.0,
                   help="carve a split 'val' of this fraction out of train, stratified by the given label, "
                        "keeping its noisy labels (select checkpoints on it: select_split val)")
    p.add_argument("--train-subset", type=int, default=0,
                   help="keep a stratified random N of the train split (before noise), for quick studies")
    p.add_argument("--resize", type=int, help="shrink images so the shorter side is at most this (re-encodes JPEG)")
    p.add_argument("--splits", help="comma-separated subset of splits to write (default: all)")
    p.add_argument("--subset", default="mini", help="webvision: mini (50 classes, Google) or full")
    p.add_argument("--sources", default="google", help="webvision full: google,flickr")
    p.add_argument("--num-classes", type=int, help="webvision / ilsvrc12-val: keep classes < N (mini: 50)")
    p.add_argument("--synsets", help="ilsvrc12-val: WebVision info/synsets.txt (wnid on line c = class c)")
    p.add_argument("--solution", help="ilsvrc12-val flat layout: LOC_val_solution.csv")
    p.add_argument("--devkit", help="ilsvrc12-val flat layout: folder with the ground truth txt and meta.mat")
    p.add_argument("--folder-split", default="train", help="folder: the split name to write")
    p.add_argument("--workers", type=int, default=1, help="processes reading and validating images")
    p.add_argument("--shard-size", type=int, default=10000, help="samples per shard")
    p.add_argument("--max-skip-fraction", type=float, default=0.01,
                   help="fail when more than this fraction of a split's images is missing or undecodable")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the splits of this data set already prepared in --out (else writing a split that "
                        "exists there is refused)")
    return p


def main(argv=None) -> int:
    """Entry point; errors in the annotations exit with the message naming file and line."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    try:
        prepare(args)
    except WriteFailed as e:
        logger.error("error: %s", e.strerror)
        return 2
    except (sources.AnnotationError, TooManySkipped, ShardError, ValueError, OSError) as e:
        logger.error("error: %s", e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
