"""Training methods: given a batch and the per-sample tables, return mixed inputs and soft targets.

One file a method; `base` holds the tables, soft cross-entropy and the mixing helpers they share.
"""
from __future__ import annotations

import numpy as np

from .base import (CRITERIA, CrossEntropy, Tables, beta_draw, clean_weights, group_rows, guessed_targets, mix_groups, prior_penalty,
                   probability_loss, sharpen_rows, soft_cross_entropy, unwrap)
from .mixnn import MixNN, MixNNInBatch
from .mixup import Mixup
from .select import ConfidentLearning, Select, SelectCorrect
from .selectmix import SelectMix

__all__ = ["CRITERIA", "beta_draw", "ConfidentLearning", "CrossEntropy", "Mixup", "MixNN", "MixNNInBatch", "Select", "SelectCorrect", "SelectMix", "Tables", "clean_weights", "create_method",
           "group_rows", "guessed_targets", "mix_groups", "prior_penalty", "probability_loss", "sharpen_rows", "soft_cross_entropy", "unwrap"]


NEEDS_CROSS_VALIDATION = ("selectmix", "confident-learning")


def create_method(cfg, labels: np.ndarray | None = None, num_classes: int = 0, oos: np.ndarray | None = None):
    """The configured method object; `labels` are the given labels by sample id, `oos` the out-of-sample
    probabilities of the cross-validation stage (SelectMix, Confident Learning)."""
    if cfg.method in NEEDS_CROSS_VALIDATION and oos is None:
        raise ValueError(f"--method {cfg.method} needs the out-of-sample probabilities of train.crossval")
    if cfg.method == "ce":
        return CrossEntropy()
    if cfg.method == "mixup":
        return Mixup(cfg.mixup_alpha)
    guess = cfg.sharpen if getattr(cfg, "guess", "none") == "online" else None
    if cfg.method == "mixnn" and getattr(cfg, "knn_scope", "global") == "batch":
        return MixNNInBatch(cfg.k, cfg.weights, cfg.mixup_alpha, guess=guess, threshold=cfg.clean_threshold,
                            mode=getattr(cfg, "batch_knn_mode", "eval"))
    if cfg.method == "mixnn":
        return MixNN(cfg.k, cfg.weights, cfg.partners, cfg.mixup_alpha, guess=guess, threshold=cfg.clean_threshold)
    if cfg.method == "select":
        return Select(cfg.clean_threshold)
    if cfg.method == "select-correct":
        return SelectCorrect(labels, num_classes, cfg.clean_threshold, guess=guess,
                             mixup_alpha=cfg.mixup_alpha if getattr(cfg, "select_mixup", False) else None)
    if cfg.method == "selectmix":
        return SelectMix(oos, labels, threshold=cfg.selectmix_threshold, confident=cfg.selectmix_confident,
                         alpha=cfg.mixup_alpha, rule=cfg.selectmix_rule, guess=guess)
    if cfg.method == "confident-learning":
        return ConfidentLearning(oos, labels)
    raise ValueError(f"--method {cfg.method!r}: expected one of ce, mixup, mixnn, selectmix, select, "
                     "select-correct, confident-learning (dividemix: train.dividemix)")
