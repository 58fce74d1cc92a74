"""Selection baselines: the simplest uses of a noise detector, as the reference our mixing methods must beat.

- `select`: after warm-up, cross-entropy only on the samples the GMM judges clean (P(clean) above the
  threshold), refreshed every epoch.
- `select-correct`: every sample; the clean ones on their given label, the others on their corrected
  soft target (the run's `target_source`/`ema` correction), or with `guess: online` on the network's current
  sharpened prediction; with `select_mixup` the batch is then mixed in-batch (mixup of the images and these
  targets, DivideMix's labelled/unlabelled mixup with one network and one view).
- `confident-learning`: cleanlab's `find_label_issues` on K-fold out-of-sample probabilities (the same
  cross-validation stage as SelectMix), then cross-entropy on the samples it keeps, for the whole run.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from .base import CrossEntropy, Tables, group_rows, guess_temperature, guessed_targets
from .mixup import mix_in_batch


@dataclass
class SelectCorrectOptions:
    """Select-correct's options."""

    section: ClassVar[str] = "select_correct"
    select_mixup: bool = False  # select-correct: mix each batch in-batch (lambda ~ Beta(mixup_alpha)) after the
    #                             split, clean rows on their given and noisy rows on their corrected targets


class Select(CrossEntropy):
    """CE on the samples judged clean by the last GMM."""

    name, uses_tables = "select", True

    def __init__(self, threshold: float = 0.5):
        self.threshold = threshold

    @classmethod
    def from_config(cls, cfg, labels, num_classes, oos=None):
        return cls(cfg.clean_threshold)

    def train_ids(self, ids: np.ndarray, tables: Tables) -> np.ndarray | None:
        if tables.clean is None:
            return None
        return ids[tables.clean[ids] > self.threshold]


class SelectCorrect(CrossEntropy):
    """Clean samples on their given label, the others on their corrected soft target; `mixup_alpha` set:
    then mixup inside the batch."""

    name, uses_tables, guesses = "select-correct", True, True
    options = (SelectCorrectOptions,)
    # one mixture per class on log-losses, measured better for it on Fashion-MNIST (docs/benchmarks.md,
    # "Defaults and why")
    defaults = {"gmm_split": "class", "gmm_scale": "log"}

    def __init__(self, labels: np.ndarray, num_classes: int, threshold: float = 0.5, guess: float | None = None,
                 mixup_alpha: float | None = None):
        self.labels, self.num_classes, self.threshold, self.guess = labels, num_classes, threshold, guess
        self.mixup_alpha = mixup_alpha

    @classmethod
    def from_config(cls, cfg, labels, num_classes, oos=None):
        return cls(labels, num_classes, cfg.clean_threshold, guess=guess_temperature(cfg),
                   mixup_alpha=cfg.mixup_alpha if cfg.select_mixup else None)

    def inputs_targets(self, batch, tables: Tables, generator, model=None):
        images, ids, valid = group_rows(batch, 0)
        images, ids = images[valid, 0], ids[valid, 0].cpu()
        soft = tables.targets.rows(ids)
        if tables.clean is None:  # warm-up, no GMM yet: the table's rows, unmixed
            return images, soft.to(images.device)
        given = F.one_hot(torch.from_numpy(self.labels[ids.numpy()]), self.num_classes).float()
        clean = torch.from_numpy(tables.clean[ids.numpy()] > self.threshold)
        if self.guess is not None:  # the others on the network's current sharpened prediction
            soft = guessed_targets(model, images, soft, ~clean, self.guess)
        soft = torch.where(clean[:, None], given, soft).to(images.device)
        return (images, soft) if self.mixup_alpha is None else mix_in_batch(images, soft, self.mixup_alpha, generator)


def label_issues(labels: np.ndarray, oos: np.ndarray) -> np.ndarray:
    """[N] bool: cleanlab's `find_label_issues` on out-of-sample probabilities [N, C], in this process. With its
    default n_jobs cleanlab forks a multiprocessing pool on Linux; forked from a training process (torch's
    threads, a gloo group) a worker can block forever on a lock, and the run hangs before its first epoch
    (seen here: one SelectMix run of ~20). The result does not depend on n_jobs."""
    from cleanlab.filter import find_label_issues

    return find_label_issues(labels, oos, n_jobs=1)


class ConfidentLearning(CrossEntropy):
    """CE on the samples cleanlab does not flag, from out-of-sample probabilities [N, C]."""

    name, cross_validation = "confident-learning", True

    def __init__(self, oos: np.ndarray, labels: np.ndarray):
        self.issues = label_issues(labels, oos)  # [N] bool
        self.labels = labels

    @classmethod
    def from_config(cls, cfg, labels, num_classes, oos=None):
        return cls(oos, labels)

    def train_ids(self, ids: np.ndarray, tables: Tables) -> np.ndarray | None:
        return ids[~self.issues[ids]]

    def epoch_metrics(self, true_labels: np.ndarray) -> dict:
        out = {"removed_fraction": float(self.issues.mean())}
        known = true_labels >= 0
        if known.any():
            wrong = (self.labels != true_labels) & known
            out["removed_precision"] = float((wrong & self.issues).sum() / max((self.issues & known).sum(), 1))
            out["removed_recall"] = float((wrong & self.issues).sum() / max(wrong.sum(), 1))
        return out
