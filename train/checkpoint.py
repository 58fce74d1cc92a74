"""Atomic checkpoints: written to a temporary file and renamed, so a crash never leaves a half `last.pt`.

Layout in the run folder: `checkpoints/epoch-XXXX.pt` (the newest `keep` are kept), `last.pt` and
`best.pt` (hard links to the epoch files, or copies where links are not possible).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch


def atomic_save(obj, path: Path) -> None:
    """torch.save to `path.tmp`, fsync, then os.replace."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_link(src: Path, dst: Path) -> None:
    """Point `dst` at the same bytes as `src` (hard link, else copy), replacing it atomically."""
    tmp = dst.with_name(dst.name + ".tmp")
    if tmp.exists():
        tmp.unlink()
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def save_checkpoint(run_dir: Path, state: dict, epoch: int, *, keep: int, is_best: bool) -> Path:
    """Write the epoch checkpoint, update last (and best), prune old epoch files. Main process only."""
    folder = run_dir / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"epoch-{epoch:04d}.pt"
    atomic_save(state, path)
    atomic_link(path, run_dir / "last.pt")
    if is_best:
        atomic_link(path, run_dir / "best.pt")
    for old in sorted(folder.glob("epoch-*.pt"))[:-keep]:
        old.unlink()
    return path


def load_checkpoint(path: Path) -> dict:
    """Load a checkpoint with weights_only=True: tensors and plain values, never arbitrary objects."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint to resume from")
    return torch.load(path, map_location="cpu", weights_only=True)


def find_checkpoint(run_dir: Path, which: str = "last") -> Path:
    """`last`, `best` or an explicit path."""
    if which in ("last", "best"):
        return Path(run_dir) / f"{which}.pt"
    return Path(which)
