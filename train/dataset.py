"""The prepared data set of a run: shards folder, manifest, training views and eval splits."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from accelerate import Accelerator
from accelerate.logging import get_logger

from data.epoch_cache import HEADER, EpochCache, cache_path, file_bytes, fitting_slots, new_token, slot_bytes
from data.reader import ShardDataset
from data.shards import ShardError, read_manifest, verify_split
from data.transforms import EvalTransform, ResizeStep, TrainTransform, caches_resized, draft_for, get_preset

from .config import UserError

if TYPE_CHECKING:  # Config is built on first use (train.config.config_class)
    from .config import Config

logger = get_logger(__name__)


@dataclass
class Data:
    """The prepared data set: manifest, training split (augmenting and plain views), eval splits."""

    root: Path
    manifest: dict
    train: ShardDataset  # train transform
    train_plain: ShardDataset  # eval transform, for the refresh pass
    evals: dict  # split name -> ShardDataset
    input_shape: tuple


def data_root(cfg: Config) -> Path:
    """The prepared shards folder: `data`, or for the built-in digits set a name made of its preparation."""
    val = f"-val{cfg.val_fraction:g}" if cfg.val_fraction else ""
    return Path(cfg.data or f"shards/{cfg.dataset}-{cfg.noise.replace(':', '')}-s{cfg.noise_seed}{val}")


def ensure_prepared(cfg: Config, accelerator: Accelerator) -> Path:
    """Prepare the built-in digits set on first use (main process; the others wait)."""
    root = data_root(cfg)
    if not (root / "dataset.json").is_file() and cfg.dataset != "digits":  # checked on every rank
        raise UserError(f"{root}/dataset.json not found: prepare the data with "
                        f"`python -m data.prepare {cfg.dataset} --root RAW --out {root}` (or set --data)")
    if accelerator.is_main_process and not (root / "dataset.json").is_file():
        from data.prepare import build_parser, prepare

        logger.info("preparing digits with %s noise into %s", cfg.noise, root)
        args = ["digits", "--out", str(root), "--noise", cfg.noise, "--seed", str(cfg.noise_seed)]
        try:
            prepare(build_parser().parse_args(args + (["--val-fraction", str(cfg.val_fraction)] if cfg.val_fraction else [])))
        except OSError as e:  # includes WriteFailed: a read-only or full disk
            raise UserError(f"cannot prepare the digits set into {root} ({e.strerror or e}); run from a writable "
                            "folder or set --data") from None
    accelerator.wait_for_everyone()
    return root


def load_data(cfg: Config, accelerator: Accelerator) -> Data:
    """Open the training split (augmenting and plain views) and the eval splits; cache small ones decoded.
    Batches come out uint8 and are normalised on the device (`ShardDataset.to_device`)."""
    root = ensure_prepared(cfg, accelerator)
    try:
        manifest = read_manifest(root)
        for split in [cfg.train_split, *cfg.eval_splits]:
            if split not in manifest["splits"]:
                raise UserError(f"{root} has no split {split!r} (it has {', '.join(manifest['splits'])}); prepare "
                                "it (a noisy val split: data.prepare --val-fraction F) or change "
                                "--eval_splits/--train_split")
        tables = {split: verify_split(root / split, manifest["splits"][split], manifest["num_classes"],
                                      crc=cfg.verify_crc) for split in [cfg.train_split, *cfg.eval_splits]}
        preset = get_preset(cfg.dataset, cfg.image_size or None)
        train = ShardDataset(root / cfg.train_split, TrainTransform(preset=preset, normalise=False), preset.mode,
                             table=tables[cfg.train_split])
        evals = {s: ShardDataset(root / s, EvalTransform(preset=preset, normalise=False), preset.mode, table=tables[s])
                 for s in cfg.eval_splits}
    except ShardError as e:
        raise UserError(str(e)) from None
    if cfg.batch_size > len(train):
        raise UserError(f"--batch_size {cfg.batch_size} is larger than the training split ({len(train)} samples "
                        f"in {root / cfg.train_split}): every sample would be drawn several times a step; use a "
                        "smaller batch")
    if cfg.batch_size % accelerator.num_processes:
        raise UserError(f"--batch_size {cfg.batch_size} (global) must be a multiple of the {accelerator.num_processes} "
                        "processes")
    draft = decode_size(cfg, preset)
    for ds in (train, *evals.values()):
        ds.draft_size = draft
    left = cache_images(cfg, [train, *evals.values()])
    if cfg.epoch_cache == "auto" and not train.cached and caches_resized(preset):
        open_epoch_cache(train, preset, left, accelerator)
    plain = train.with_transform(EvalTransform(preset=preset, normalise=False))  # shares the caches
    return Data(root, manifest, train, plain, evals, (1 if preset.mode == "L" else 3, preset.size, preset.size))


def decode_size(cfg: Config, preset) -> tuple[int, int] | None:
    """The size JPEGs may be decoded down to (`decode_draft`; data.transforms.draft_for), None: in full."""
    return draft_for(preset) if cfg.decode_draft == "auto" else None


def cache_images(cfg: Config, datasets: list[ShardDataset]) -> int:
    """Decode small splits into memory once (`cache_images`), in order, within `cache_max_mb` per process;
    returns the bytes of that budget left."""
    budget = cfg.cache_max_mb << 20
    if cfg.cache_images == "false":
        return budget
    if cfg.cache_images == "true":
        budget = 1 << 62
    for ds in datasets:
        if ds.cache_decoded(budget):
            budget -= ds.cache_bytes
        else:
            logger.info("%s: not cached (decoded images would exceed cache_max_mb=%d)", ds.split_dir,
                        cfg.cache_max_mb)
    return max(budget, 0) if cfg.cache_images == "auto" else cfg.cache_max_mb << 20


def open_epoch_cache(train: ShardDataset, preset, budget: int, accelerator: Accelerator) -> None:
    """The node-shared epoch cache of the training split (data.epoch_cache): `budget` bytes per process of the
    node, created by the node's first process in /dev/shm (within its free space), opened by every process
    before any DataLoader worker forks, then unlinked."""
    from accelerate.utils import broadcast_object_list

    local = int(os.environ.get("LOCAL_WORLD_SIZE", 1)) if accelerator.num_processes > 1 else 1
    nbytes = slot_bytes(1 if preset.mode == "L" else 3, preset.resize, preset.square)
    token = broadcast_object_list([new_token()])[0] if accelerator.num_processes > 1 else new_token()
    path = cache_path(token)
    if accelerator.is_local_main_process:
        wanted = min(len(train), budget * local // (nbytes + HEADER * 8))
        slots = fitting_slots(path.parent, wanted, nbytes)
        EpochCache(path, slots, nbytes)
        logger.info("epoch cache: %d of %d training images (%.0f MB in %s%s)", slots, len(train),
                    file_bytes(slots, nbytes) / 2**20, path.parent,
                    "" if slots == wanted else f"; {wanted} wanted, the folder's free space allows {slots}")
    accelerator.wait_for_everyone()
    cache = EpochCache(path)
    accelerator.wait_for_everyone()
    if accelerator.is_local_main_process:
        cache.unlink()
    train.use_epoch_cache(cache, ResizeStep(preset=preset))
