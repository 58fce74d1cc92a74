"""Run a method's authors' own training script on our data, minimally adapted, for side-by-side comparison.

The authors' code is never copied into this repository: the adapters read it at run time from a checkout
the user names (`--authors DIR`), apply a fixed list of textual changes (`Change`: each must match exactly
once, else the run stops and names it, so a different version of their code is never run half-adapted),
and execute it. What the changes do, for every adapter: the data come from our prepared shards (same
images, same noisy labels, same train/test split, our transforms), the network is ours (a timm model
wrapped to return what their network returns), everything runs on the CPU, and every random stream they
use is seeded. Each adapter lists its own changes with the reason for each (`bench/authors_mixnn.py`,
`bench/authors_dividemix.py`); `--print-changes` prints them.

This module holds what the adapters share: the shard loaders with the authors' loader interface, the
model wrapper, the patching and the result file (imported by the adapters; not a script).
"""
from __future__ import annotations

import json
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from data.reader import ShardDataset  # noqa: E402
from data.shards import read_manifest, verify_split  # noqa: E402
from data.transforms import EvalTransform, TrainTransform, get_preset  # noqa: E402


@dataclass(frozen=True)
class Change:
    """One textual change to an authors' file: `old` (must occur exactly once) becomes `new`, because `why`."""

    old: str
    new: str
    why: str
    every: bool = False  # replace every occurrence (at least one) instead of exactly one


class AdapterError(SystemExit):
    """The authors' file is not the version the adapter was written for (a change does not match)."""


def apply_changes(source: str, changes: list[Change], name: str, commit: str) -> str:
    """`source` with every change applied in order; each `old` must occur exactly once."""
    for change in changes:
        found = source.count(change.old)
        if found != 1 and not (change.every and found):
            raise AdapterError(f"{name}: expected exactly one occurrence of {change.old[:60]!r}, found {found}; "
                               f"this adapter follows the authors' commit {commit} ({change.why})")
        source = source.replace(change.old, change.new)
    return source


def read_source(path: Path) -> str:
    """An authors' file with LF line ends and no trailing blanks (formatting only), the form the changes match."""
    return "\n".join(line.rstrip() for line in path.read_text().splitlines()) + "\n"


def print_changes(changes_by_file: dict[str, list[Change]]) -> None:
    for name, changes in changes_by_file.items():
        print(f"## {name}")
        for i, c in enumerate(changes, 1):
            print(f"{i}. {c.why}\n   - {c.old.strip()[:200]!r}\n   + {c.new.strip()[:200]!r}")


def open_split(root: Path, split: str, transform, mode: str) -> ShardDataset:
    """One of our prepared splits, checked as a run checks it, decoded into memory once."""
    manifest = read_manifest(root)
    table = verify_split(root / split, manifest["splits"][split], manifest["num_classes"])
    ds = ShardDataset(root / split, transform, mode, table=table)
    ds.cache_decoded(1 << 40)
    return ds


class Pairs(torch.utils.data.Dataset):
    """(image, label) rows: the authors' test sets return two items, not three."""

    def __init__(self, ds: ShardDataset):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        image, label, _ = self.ds[i]
        return image, label


def shard_datasets(root: Path, dataset: str):
    """(train with our train transform, train with our eval transform, test) of a prepared data set;
    train rows are (image, noisy label, sample id) as the authors' train sets return."""
    preset = get_preset(dataset)
    train = open_split(root, "train", TrainTransform(preset=preset), preset.mode)
    return train, train.with_transform(EvalTransform(preset=preset)), \
        open_split(root, "test", EvalTransform(preset=preset), preset.mode)


class AuthorsNet(torch.nn.Module):
    """Our timm network with the authors' output interface: `outputs` names what their forward returns
    ("logits" or "logits,features,none")."""

    def __init__(self, net: torch.nn.Module, outputs: str = "logits"):
        super().__init__()
        self.net, self.outputs = net, outputs

    def forward(self, x):
        features = self.net.forward_head(self.net.forward_features(x), pre_logits=True)
        logits = self.net.get_classifier()(features)
        return logits if self.outputs == "logits" else (logits, features, None)


def our_network(name: str, num_classes: int, in_chans: int, outputs: str) -> AuthorsNet:
    from train.models import create_model

    return AuthorsNet(create_model(name, num_classes, in_chans), outputs)


def run_source(source: str, filename: str, argv: list[str], modules: dict[str, types.ModuleType]) -> dict:
    """Execute a (patched) script as `__main__` with `argv`, the given modules importable; its globals."""
    sys.modules.update(modules)
    old_argv, sys.argv = sys.argv, [filename, *argv]
    namespace = {"__name__": "__main__", "__file__": filename}
    try:
        exec(compile(source, filename, "exec"), namespace)
    finally:
        sys.argv = old_argv
    return namespace


def module_from_source(name: str, source: str, filename: str, extra: dict | None = None) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__file__ = filename
    module.__dict__.update(extra or {})
    exec(compile(source, filename, "exec"), module.__dict__)
    return module


def write_result(out: Path, result: dict) -> None:
    """`out/result.json` (written last: its presence marks a finished run for --reuse)."""
    from data.atomic import atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "result.json", json.dumps(result, indent=1))


def label_correction(soft_labels: torch.Tensor, true_labels: np.ndarray) -> float:
    """Share of samples whose corrected label argmax(t) is the true one."""
    return float((soft_labels.argmax(1).cpu().numpy() == true_labels).mean())


def base_arguments(p, window_rate: float) -> None:
    """The options every adapter takes; the schedule ones in the authors' own terms."""
    p.add_argument("--authors", type=Path, required=True, help="checkout of the authors' repository (read only)")
    p.add_argument("--r", type=float, help="noise rate of the shards (their script averages the GMM's losses over "
                   f"5 epochs only when it is {window_rate})")
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--data", type=Path, required=True, help="our prepared shards (python -m data.prepare)")
    p.add_argument("--dataset", default="digits", help="transform preset of the shards")
    p.add_argument("--model", default="small_cnn")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="result folder (result.json, the authors' own files)")
    p.add_argument("--reuse", action="store_true", help="keep a finished result")
    p.add_argument("--print-changes", action="store_true", help="print the changes made to the authors' code")


def finished_or_shown(p, args, changes_by_file: dict[str, list[Change]]) -> bool:
    """True when there is nothing to train: the changes were printed (`--print-changes`) or a finished
    result is kept (`--reuse`, printed). Checks the options a training run needs."""
    if args.print_changes:
        print_changes(changes_by_file)
        return True
    if args.out is None or args.r is None:
        p.error("--out and --r are required")
    if args.reuse and (args.out / "result.json").is_file():
        print(json.loads((args.out / "result.json").read_text()))
        return True
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    return False


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
