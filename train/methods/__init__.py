"""Training methods: given a batch and the per-sample tables, return mixed inputs and soft targets.

One file a method; `base` holds the tables, soft cross-entropy and the mixing helpers they share.
"""
from __future__ import annotations

from .base import CrossEntropy, Tables, clean_weights, group_rows, mix_groups, soft_cross_entropy, unwrap
from .mixnn import MixNN, MixNNInBatch
from .mixup import Mixup
from .selectmix import SelectMix

__all__ = ["CrossEntropy", "Mixup", "MixNN", "MixNNInBatch", "SelectMix", "Tables", "clean_weights", "create_method",
           "group_rows", "mix_groups", "soft_cross_entropy", "unwrap"]


def create_method(cfg) -> CrossEntropy:
    """The configured method object."""
    if cfg.method == "ce":
        return CrossEntropy()
    if cfg.method == "mixup":
        return Mixup(cfg.mixup_alpha)
    if cfg.method == "mixnn" and getattr(cfg, "knn_scope", "global") == "batch":
        return MixNNInBatch(cfg.k, cfg.weights)
    if cfg.method == "mixnn":
        return MixNN(cfg.k, cfg.weights, cfg.partners)
    raise ValueError(f"--method {cfg.method!r}: expected ce, mixup or mixnn")
