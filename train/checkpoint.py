"""Atomic, checksummed checkpoints: written to a temporary file and renamed, so a crash never leaves a half
`last.pt`; each carries a digest of its own contents, so a damaged file is recognised and skipped.

Layout in the run folder: `checkpoints/epoch-XXXX.pt` (the newest `keep` are kept), `last.pt` and
`best.pt` (hard links to the epoch files, or copies where links are not possible). A resume takes the
newest checkpoint that loads and matches its digest: `last.pt`, else the epoch files newest first.
"""
from __future__ import annotations

import errno
import hashlib
import logging
import os
import shutil
from pathlib import Path

import torch

from data.atomic import atomic_write, fsync_folder, temporary_path
from index.comm import all_gather_rows

from .config import UserError, config_record
from .targets import Tables

logger = logging.getLogger(__name__)


class DamagedCheckpoint(UserError):
    """A checkpoint that does not load, or whose contents do not match the digest written with it."""


def state_digest(obj, h=None) -> str:
    """SHA-256 over a checkpoint's contents: every tensor's dtype, shape and bytes, every plain value, in key
    order. Recomputed on load, it detects flipped bytes that still unpickle."""
    top = h is None
    h = h or hashlib.sha256()
    if isinstance(obj, dict):
        for key in sorted(obj, key=str):
            h.update(f"k{key!r}".encode())
            state_digest(obj[key], h)
    elif isinstance(obj, (list, tuple)):
        h.update(f"l{len(obj)}".encode())
        for item in obj:
            state_digest(item, h)
    elif isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"t{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    else:
        h.update(f"v{obj!r}".encode())
    return h.hexdigest() if top else ""


def atomic_save(obj, path: Path) -> None:
    """torch.save to a temporary file, fsync, then os.replace (data.atomic). torch.save reports a failed write
    (a full disk) as a RuntimeError of its zip writer: it becomes the OSError data.atomic turns into
    WriteFailed."""
    def write(f):
        try:
            torch.save(obj, f)
        except RuntimeError as e:
            full = shutil.disk_usage(path.parent).free < (16 << 20)
            raise OSError(errno.ENOSPC if full else errno.EIO, os.strerror(errno.ENOSPC if full else errno.EIO)) from e

    atomic_write(path, write)


def atomic_link(src: Path, dst: Path) -> None:
    """Point `dst` at the same bytes as `src` (hard link, else copy), replacing it atomically."""
    tmp = temporary_path(dst)
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
    fsync_folder(dst.parent)


def save_verified(state: dict, path: Path) -> None:
    """Write `state` atomically with the digest that load_checkpoint checks."""
    atomic_save({**state, "checksum": state_digest(state)}, path)


def rng_states() -> list[torch.Tensor]:
    """Every rank's CPU RNG state (collective), for a checkpoint that resumes each rank's draws."""
    return [torch.from_numpy(r[0]) for r in all_gather_rows(torch.get_rng_state().numpy()[None])]


def restore_rng(states: list[torch.Tensor], accelerator) -> None:
    """This rank's RNG state from `rng_states()`'s list (skipped when the run has another number of ranks)."""
    if len(states) == accelerator.num_processes:
        torch.set_rng_state(states[accelerator.process_index])


def save_checkpoint(run_dir: Path, state: dict, epoch: int, *, keep: int, is_best: bool) -> Path:
    """Write the epoch checkpoint (with its digest), update last (and best), prune old epoch files. Main
    process only."""
    folder = run_dir / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"epoch-{epoch:04d}.pt"
    save_verified(state, path)
    atomic_link(path, run_dir / "last.pt")
    if is_best:
        atomic_link(path, run_dir / "best.pt")
    for old in sorted(folder.glob("epoch-*.pt"))[:-keep]:
        old.unlink()
    return path


def load_checkpoint(path: Path, mmap: bool = False) -> dict:
    """Load a checkpoint with weights_only=True (tensors and plain values, never arbitrary objects) and check
    its digest. Raises DamagedCheckpoint naming the file when it cannot be read or does not match."""
    path = Path(path)
    if not path.is_file():
        raise DamagedCheckpoint(f"{path}: no such checkpoint")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # a truncated zip, a flipped header, a pickle weights_only refuses, not a checkpoint
        raise DamagedCheckpoint(f"{path}: cannot be read as a checkpoint ({type(e).__name__}: "
                                f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
    if not isinstance(state, dict):
        raise DamagedCheckpoint(f"{path}: not a checkpoint of this project")
    expected = state.pop("checksum", None)
    if expected is not None and state_digest(state) != expected:
        raise DamagedCheckpoint(f"{path}: contents do not match the checksum written with them (damaged on disk)")
    return state


def find_checkpoint(run_dir: Path, which: str = "last") -> Path:
    """`last`, `best` or an explicit path."""
    if which in ("last", "best"):
        return Path(run_dir) / f"{which}.pt"
    return Path(which)


def resume_candidates(run_dir: Path) -> list[Path]:
    """`last.pt`, then the epoch checkpoints newest first (one entry per file on disk)."""
    paths = [Path(run_dir) / "last.pt", *sorted((Path(run_dir) / "checkpoints").glob("epoch-*.pt"), reverse=True)]
    seen, out = set(), []
    for p in paths:
        try:
            inode = p.stat().st_ino
        except OSError:
            continue
        if inode not in seen:
            seen.add(inode)
            out.append(p)
    return out


def load_resume_checkpoint(run_dir: Path, mmap: bool = False, warn: bool = True) -> tuple[Path, dict] | None:
    """The newest good checkpoint of a run folder (path, state), falling back past damaged ones with a warning
    for each; None when the folder has no checkpoint at all. Raises DamagedCheckpoint when every one is damaged."""
    candidates = resume_candidates(run_dir)
    problems = []
    for path in candidates:
        try:
            state = load_checkpoint(path, mmap=mmap)
            if "model" not in state or "epoch" not in state:
                raise DamagedCheckpoint(f"{path}: not a training checkpoint (no model state)")
        except DamagedCheckpoint as e:
            problems.append(str(e))
            continue
        if problems and warn:
            for p in problems:
                logger.warning("skipping a damaged checkpoint: %s", p)
            logger.warning("resuming from %s (epoch %d) instead", path, state["epoch"])
        return path, state
    if problems:
        raise DamagedCheckpoint(f"{run_dir}: every checkpoint is damaged: " + "; ".join(problems))
    return None


def checkpoint_state(run, epoch: int, step: int | None = None) -> dict:
    """Everything a resumed run needs from `run` (train.main.Run: model, optimizer, scheduler, tables, method,
    best record, config); every rank's RNG state is gathered into the one file. `epoch`/`step` name where to
    continue: step 0 of the next epoch, or mid-epoch after a preemption."""
    tables = run.tables
    return {"model": run.accelerator.unwrap_model(run.model).state_dict(), "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(), "epoch": epoch + 1 if step is None else epoch,
            "step": step or 0, "targets": tables.targets.state_dict(),
            "clean": None if tables.clean is None else torch.from_numpy(tables.clean),
            "partners": None if tables.partners is None else torch.from_numpy(tables.partners),
            "loss_history": None if tables.loss_history is None else torch.from_numpy(tables.loss_history),
            "method": run.method.state_dict() if run.method is not None else {},
            "rng": rng_states(), "best": run.best, "config": config_record(run.cfg)}


def method_entry(state: dict, legacy_keys: tuple) -> tuple[dict, dict]:
    """(the shared state, the method's own entry) of a checkpoint. In a checkpoint of a version before methods
    had an entry, the method's state sat at the top level under its `legacy_keys`: moved out of the shared
    state into the entry (e.g. DivideMix's two-network `loss_history` is not the shared tables' history)."""
    if "method" in state:
        return state, state["method"]
    return {k: v for k, v in state.items() if k not in legacy_keys}, {k: state.get(k) for k in legacy_keys}


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
    restore_rng(state["rng"], accelerator)
    return state["epoch"], state.get("step", 0), state["best"]
