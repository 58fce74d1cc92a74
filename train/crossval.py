"""K-fold cross-validation stage: one model per fold, trained with the same epoch machinery on the other
folds, predicts its held-out fold -> out-of-sample probabilities for every sample id."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
from accelerate.logging import get_logger

from index.comm import gather_by_id

from .config import Config
from .dataset import Data
from .epoch import run_epoch
from .methods import CrossEntropy, Tables
from .methods.selectmix import fold_file, load_folds, save_fold, stratified_folds
from .models import create_model
from .optim import create_optimizer
from .tables import refresh_train
from .targets import SoftTargets

logger = get_logger(__name__)


def predict_held_out(cfg: Config, model, data: Data, held: np.ndarray, accelerator) -> np.ndarray:
    """[N, C] softmax of the held-out ids (rows of other ids are zero), identical on every rank."""
    stats = refresh_train(cfg, model, data, np.array_split(held, accelerator.num_processes)[accelerator.process_index],
                          accelerator)
    return gather_by_id(stats.ids, stats.probs, len(data.train))


def train_fold(cfg: Config, fold: int, folds: np.ndarray, data: Data, accelerator, num_classes: int) -> np.ndarray:
    """Train fold `fold`'s model on the other folds; its held-out softmax [n_held, C] at the epoch of best
    held-out accuracy against the given (noisy) labels (`cv_best_epoch`), else at the last epoch."""
    labels = data.train.labels
    fold_cfg = dataclasses.replace(cfg, warmup_epochs=cfg.cv_epochs, restart_period=cfg.cv_epochs,
                                   memorisation_every=0)
    torch.manual_seed(cfg.seed * 1000 + fold)
    model = create_model(cfg.model, num_classes, data.input_shape[0], pretrained=cfg.pretrained,
                         drop_rate=cfg.drop_rate, channels_last=cfg.channels_last)
    optimizer, scheduler = create_optimizer(fold_cfg, model)
    model, optimizer = accelerator.prepare(model, optimizer)
    tables = Tables(SoftTargets(labels, num_classes))
    held = np.flatnonzero(folds == fold)
    best, best_acc = None, -1.0
    for epoch in range(cfg.cv_epochs):
        run_epoch(fold_cfg, epoch, model, optimizer, CrossEntropy(), data, tables, accelerator,
                  subset=np.flatnonzero(folds != fold))
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


def out_of_sample_probabilities(cfg: Config, data: Data, accelerator, run_dir: Path, num_classes: int) -> np.ndarray:
    """Out-of-sample softmax [N, C] from K fold models trained on the other folds (SelectMix stage 1;
    Confident Learning). Each finished fold is saved in the run folder and not retrained after a crash."""
    folds = stratified_folds(data.train.labels, cfg.cv_folds, cfg.seed)
    for fold in range(cfg.cv_folds):
        if fold_file(run_dir, fold).is_file():
            continue
        probs = train_fold(cfg, fold, folds, data, accelerator, num_classes)
        if accelerator.is_main_process:
            save_fold(run_dir, fold, np.flatnonzero(folds == fold), probs)
        accelerator.wait_for_everyone()
    return load_folds(run_dir, cfg.cv_folds, len(data.train), num_classes)
