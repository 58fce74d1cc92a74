"""K-fold cross-validation stage: one model per fold, trained with the same epoch machinery on the other
folds, predicts its held-out fold -> out-of-sample probabilities for every sample id."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from accelerate.logging import get_logger

from index.comm import gather_by_id

from .checkpoint import DamagedCheckpoint, load_checkpoint, restore_rng, rng_states, save_verified
from .dataset import Data
from .epoch import run_epoch
from .methods import CrossEntropy, EpochContext, Tables
from .methods.selectmix import fold_file, load_folds, save_fold, stratified_folds
from .models import channels_last, create_model
from .optim import create_optimizer
from .seeds import fold_seed
from .tables import refresh_train
from .targets import SoftTargets

if TYPE_CHECKING:  # Config is built on first use (train.config.config_class)
    from .config import Config

logger = get_logger(__name__)


def predict_held_out(cfg: Config, model, data: Data, held: np.ndarray, accelerator) -> np.ndarray:
    """[N, C] softmax of the held-out ids (rows of other ids are zero), identical on every rank."""
    stats = refresh_train(cfg, model, data, np.array_split(held, accelerator.num_processes)[accelerator.process_index],
                          accelerator)
    return gather_by_id(stats.ids, stats.probs, len(data.train))


class StageStopped(Exception):
    """The cross-validation stage stopped at a signal; its fold state is saved and a resume continues it."""

    def __init__(self, fold: int, epoch: int, step: int):
        super().__init__(f"fold {fold} epoch {epoch} step {step}")
        self.fold, self.epoch, self.step = fold, epoch, step


def partial_fold_file(run_dir: Path, fold: int) -> Path:
    return run_dir / "selectmix" / f"fold-{fold}.partial.pt"


def save_partial_fold(path: Path, model, optimizer, scheduler, position: dict, accelerator) -> None:
    """A stopped fold's model, optimizer, scheduler, position (epoch, step, best so far) and every rank's RNG."""
    state = {"model": accelerator.unwrap_model(model).state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "rng": rng_states(), **position}
    if accelerator.is_main_process:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_verified(state, path)
    accelerator.wait_for_everyone()


def restore_partial_fold(path: Path, model, optimizer, scheduler, accelerator) -> dict | None:
    """The saved position of a stopped fold (its objects restored), or None to start the fold afresh."""
    if not path.is_file():
        return None
    try:
        state = load_checkpoint(path)
    except DamagedCheckpoint as e:
        logger.warning("%s; the fold starts again", e, main_process_only=True)
        return None
    accelerator.unwrap_model(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    restore_rng(state["rng"], accelerator)
    return state


def train_fold(cfg: Config, data: Data, accelerator, run_dir: Path, fold: int, stop=None) -> np.ndarray:
    """Train fold `fold`'s model on the other folds (`stratified_folds`); its held-out softmax [n_held, C] at the epoch of best
    held-out accuracy against the given (noisy) labels (`cv_best_epoch`), else at the last epoch. A `stop`
    request ends it after the current step: its state goes to `fold-K.partial.pt` and StageStopped is raised."""
    labels, num_classes = data.train.labels, data.manifest["num_classes"]
    folds = stratified_folds(labels, cfg.cv_folds, cfg.seed)
    fold_cfg = dataclasses.replace(cfg, warmup_epochs=cfg.cv_epochs, restart_period=cfg.cv_epochs,
                                   memorisation_every=0)
    torch.manual_seed(fold_seed(cfg.seed, fold))
    model = channels_last(create_model(cfg.model, num_classes, data.input_shape[0], pretrained=cfg.pretrained,
                                       drop_rate=cfg.drop_rate, pretrained_strict=cfg.pretrained_strict),
                          cfg.channels_last)
    optimizer, scheduler = create_optimizer(fold_cfg, model)
    model, optimizer = accelerator.prepare(model, optimizer)
    tables = Tables(SoftTargets(labels, num_classes))
    held = np.flatnonzero(folds == fold)
    partial = partial_fold_file(run_dir, fold)
    saved = restore_partial_fold(partial, model, optimizer, scheduler, accelerator)
    start, step = (saved["epoch"], saved["step"]) if saved else (0, 0)
    best = saved["best"].numpy() if saved and saved["best"] is not None else None
    best_acc = float(saved["best_acc"]) if saved else -1.0
    for epoch in range(start, cfg.cv_epochs):
        ctx = EpochContext(fold_cfg, epoch, model, data, tables, accelerator, start_step=step if epoch == start else 0)
        result = run_epoch(ctx, CrossEntropy(), optimizer, stop=stop, subset=np.flatnonzero(folds != fold))
        if result.stopped_at is not None:
            position = {"epoch": epoch, "step": result.stopped_at, "best_acc": best_acc,
                        "best": None if best is None else torch.from_numpy(best)}
            save_partial_fold(partial, model, optimizer, scheduler, position, accelerator)
            raise StageStopped(fold, epoch, result.stopped_at)
        scheduler.step()
        if cfg.cv_best_epoch or epoch + 1 == cfg.cv_epochs:
            probs = predict_held_out(cfg, model, data, held, accelerator)[held]
            acc = float((probs.argmax(1) == labels[held]).mean())
            if acc > best_acc:
                best, best_acc = probs, acc
                logger.info("fold %d/%d epoch %d: held-out accuracy vs given labels %.3f (best so far)", fold + 1,
                            cfg.cv_folds, epoch, acc, main_process_only=True)
    accelerator.free_memory(model, optimizer)  # prepare() keeps references: K fold models would stay alive
    return best


def out_of_sample_probabilities(cfg: Config, data: Data, accelerator, run_dir: Path, num_classes: int,
                                stop=None) -> np.ndarray:
    """Out-of-sample softmax [N, C] from K fold models trained on the other folds (SelectMix stage 1;
    Confident Learning). Each finished fold is saved in the run folder and not retrained after a crash."""
    folds = stratified_folds(data.train.labels, cfg.cv_folds, cfg.seed)
    for fold in range(cfg.cv_folds):
        if fold_file(run_dir, fold).is_file():
            continue
        probs = train_fold(cfg, data, accelerator, run_dir, fold, stop)
        if accelerator.is_main_process:
            save_fold(run_dir, fold, np.flatnonzero(folds == fold), probs)
            partial_fold_file(run_dir, fold).unlink(missing_ok=True)
        accelerator.wait_for_everyone()
    return load_folds(run_dir, cfg.cv_folds, len(data.train), num_classes)
