"""Atomic checkpoints: written to a temporary file and renamed, so a crash never leaves a half `last.pt`.

Layout in the run folder: `checkpoints/epoch-XXXX.pt` (the newest `keep` are kept), `last.pt` and
`best.pt` (hard links to the epoch files, or copies where links are not possible).
"""
from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import torch

from index.comm import all_gather_rows

from .methods import Tables


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


def checkpoint_state(cfg, epoch, model, optimizer, scheduler, tables, best, accelerator, step=None) -> dict:
    """Everything a resumed run needs; every rank's RNG state is gathered into the one file.
    `epoch`/`step` name where to continue: step 0 of the next epoch, or mid-epoch after a preemption."""
    rng = all_gather_rows(torch.get_rng_state().numpy()[None])
    return {"model": accelerator.unwrap_model(model).state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "epoch": epoch + 1 if step is None else epoch,
            "step": step or 0, "targets": tables.targets.state_dict(),
            "clean": None if tables.clean is None else torch.from_numpy(tables.clean),
            "partners": None if tables.partners is None else torch.from_numpy(tables.partners),
            "loss_history": None if tables.loss_history is None else torch.from_numpy(tables.loss_history),
            "clean_per_net": None if tables.clean_per_net is None else torch.from_numpy(tables.clean_per_net),
            "rng": [torch.from_numpy(r[0]) for r in rng], "best": best, "config": dataclasses.asdict(cfg)}


def restore(state: dict, model, optimizer, scheduler, tables: Tables, accelerator) -> tuple[int, int, dict]:
    """Load a checkpoint into the live objects; returns (epoch, step to continue at, best record)."""
    accelerator.unwrap_model(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    tables.targets.load_state_dict(state["targets"])
    tables.clean = None if state["clean"] is None else state["clean"].numpy()
    tables.partners = None if state["partners"] is None else state["partners"].numpy()
    history = state.get("loss_history")
    tables.loss_history = None if history is None else history.numpy()
    per_net = state.get("clean_per_net")
    tables.clean_per_net = None if per_net is None else per_net.numpy()
    if len(state["rng"]) == accelerator.num_processes:
        torch.set_rng_state(state["rng"][accelerator.process_index])
    return state["epoch"], state.get("step", 0), state["best"]
