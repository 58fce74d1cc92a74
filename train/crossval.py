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
from .loop import eval_batch_size, refresh
from .methods import CrossEntropy, Tables
from .methods.selectmix import fold_file, load_folds, save_fold, stratified_folds
from .models import create_model
from .optim import create_optimizer
from .targets import SoftTargets

logger = get_logger(__name__)


def out_of_sample_probabilities(cfg: Config, data: Data, accelerator, run_dir: Path, num_classes: int) -> np.ndarray:
    """Out-of-sample softmax [N, C] from K fold models trained on the other folds (SelectMix stage 1;
    Confident Learning). Each finished fold is saved in the run folder and not retrained after a crash."""
    labels, n = data.train.labels, len(data.train)
    folds = stratified_folds(labels, cfg.cv_folds, cfg.seed)
    fold_cfg = dataclasses.replace(cfg, warmup_epochs=cfg.cv_epochs, restart_period=cfg.cv_epochs)
    for fold in range(cfg.cv_folds):
        if fold_file(run_dir, fold).is_file():
            continue
        torch.manual_seed(cfg.seed * 1000 + fold)
        model = create_model(cfg.model, num_classes, data.input_shape[0], pretrained=cfg.pretrained,
                             drop_rate=cfg.drop_rate, channels_last=cfg.channels_last)
        optimizer, scheduler = create_optimizer(fold_cfg, model)
        model, optimizer = accelerator.prepare(model, optimizer)
        tables = Tables(SoftTargets(labels, num_classes))
        for epoch in range(cfg.cv_epochs):
            run_epoch(fold_cfg, epoch, model, optimizer, CrossEntropy(), data, tables, accelerator,
                      subset=np.flatnonzero(folds != fold))
            scheduler.step()
        held = np.flatnonzero(folds == fold)
        stats = refresh(accelerator.unwrap_model(model), data.train_plain,
                        np.array_split(held, accelerator.num_processes)[accelerator.process_index], accelerator,
                        eval_batch_size(cfg, accelerator), cfg.workers)
        probs = gather_by_id(stats.ids, stats.probs, n)
        if accelerator.is_main_process:
            save_fold(run_dir, fold, held, probs[held])
        logger.info("SelectMix fold %d/%d: out-of-sample accuracy vs given labels %.3f", fold + 1, cfg.cv_folds,
                    float((probs[held].argmax(1) == labels[held]).mean()), main_process_only=True)
        accelerator.wait_for_everyone()
    return load_folds(run_dir, cfg.cv_folds, n, num_classes)
