"""SelectMix: cross-validated confidence mismatch picks the uncertain samples; only they are mixed,
each with a confident sample of its likely class, under soft labels.

Stage 1 (`train.crossval.out_of_sample_probabilities`): split the training ids into K stratified folds, train one model per
fold on the other K-1 folds (the same epoch machinery), predict the held-out fold -> out-of-sample
softmax for every sample. Each finished fold is saved (`RUN/selectmix/fold-k.npz`) and not retrained
after a crash. Stage 2 (`SelectMix`, a method object): uncertain samples are mixed with a confident
partner of their predicted class, lambda ~ Beta(alpha, alpha); target = lambda * (out-of-sample soft
label) + (1 - lambda) * one-hot(partner's label); an uncertain sample without a partner trains on its
out-of-sample soft label alone; the others train un-mixed on their label.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from ..config import options_of
from .base import CrossEntropy, Tables, group_rows, guess_temperature, guessed_targets
from .select import label_issues


def stratified_folds(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """[N] fold index of every sample id: each class dealt round-robin over the folds after a shuffle."""
    rng = np.random.default_rng([seed, 7])
    folds = np.empty(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        folds[members] = (np.arange(len(members)) + rng.integers(k)) % k
    return folds


def split_uncertain(oos: np.ndarray, labels: np.ndarray, *, threshold: float, confident: float,
                    rule: str = "mismatch") -> tuple[np.ndarray, np.ndarray]:
    """(uncertain [N] bool, confident [N] bool) from out-of-sample probabilities [N, C].

    mismatch: uncertain when the prediction disagrees with the given label or p(given) < threshold;
    cleanlab: uncertain = cleanlab.filter.find_label_issues on the same probabilities;
    precursor: uncertain when the prediction disagrees with the given label (nothing else).
    Confident: prediction = given label with p(given) >= `confident`.
    """
    pred = oos.argmax(1)
    p_given = oos[np.arange(len(labels)), labels]
    if rule == "cleanlab":
        uncertain = label_issues(labels, oos)
    elif rule == "mismatch":
        uncertain = (pred != labels) | (p_given < threshold)
    elif rule == "precursor":
        uncertain = pred != labels
    else:
        raise ValueError(f"selectmix_rule must be mismatch, cleanlab or precursor, got {rule!r}")
    return uncertain, (pred == labels) & (p_given >= confident) & ~uncertain


@dataclass
class SelectMixOptions:
    """SelectMix's options."""

    section: ClassVar[str] = "selectmix"
    choices: ClassVar[dict] = {"selectmix_rule": ("mismatch", "cleanlab", "precursor")}
    ranges: ClassVar[dict] = {"selectmix_threshold": (lambda v: 0 <= v <= 1, "in [0, 1]"),
                              "selectmix_confident": (lambda v: 0 <= v <= 1, "in [0, 1]")}
    selectmix_rule: str = "cleanlab"  # cleanlab (find_label_issues on the out-of-sample probabilities) | mismatch
    #                                   (prediction differs or p(given) < selectmix_threshold) | precursor (the
    #                                   first author's public experiments, see train/methods/selectmix.py)
    selectmix_threshold: float = 0.5  # mismatch rule: uncertain when p(given label) is below this (or prediction differs)
    selectmix_confident: float = 0.8  # confident partner: prediction = given label with p >= this


class SelectMix(CrossEntropy):
    """Mix only the uncertain samples, each with a confident sample of its predicted class."""

    name, num_partners, cross_validation, guesses = "selectmix", 1, True, True
    options = (SelectMixOptions,)
    guess = None  # temperature of the online targets of the uncertain samples (`--guess online`; None: off)

    @classmethod
    def from_config(cls, cfg, labels, num_classes, oos=None):
        opts = options_of(cfg, SelectMixOptions)
        method = cls(oos, labels, threshold=opts.selectmix_threshold, confident=opts.selectmix_confident,
                     alpha=cfg.mixup_alpha, rule=opts.selectmix_rule)
        method.guess = guess_temperature(cfg)
        return method

    def __init__(self, oos: np.ndarray, labels: np.ndarray, *, threshold: float = 0.5, confident: float = 0.8,
                 alpha: float = 1.0, rule: str = "mismatch"):
        self.oos = oos.astype(np.float32)  # [N, C] out-of-sample softmax
        self.labels = labels
        self.uncertain, self.confident = split_uncertain(oos, labels, threshold=threshold, confident=confident,
                                                         rule=rule)
        self.alpha, self.precursor = alpha, rule == "precursor"
        pred = oos.argmax(1)
        agree = (pred == labels) & ~self.uncertain
        if self.precursor:  # any sample labelled with the predicted class
            self.pools = {c: np.flatnonzero(labels == c) for c in np.unique(labels)}
        else:  # the confident samples of a class; where a class has none (heavy noise), those agreeing with it
            self.pools = {c: np.flatnonzero(self.confident & (labels == c)) for c in np.unique(labels)}
            self.pools = {c: pool if len(pool) else np.flatnonzero(agree & (labels == c))
                          for c, pool in self.pools.items()}
        self.likely = pred

    def epoch_metrics(self, true_labels):
        return uncertainty_metrics(self, true_labels)

    def partner_ids(self, anchors, tables, epoch_ids, rng):
        """An uncertain anchor gets a random confident sample of its predicted class; others themselves."""
        partners = anchors.copy()
        for i, a in enumerate(anchors):
            pool = self.pools.get(int(self.likely[a]), ())
            if self.uncertain[a] and len(pool):
                partners[i] = pool[rng.integers(len(pool))]
        return partners[:, None]

    def inputs_targets(self, batch, tables: Tables, generator, model=None):
        images, ids, valid = group_rows(batch, 1)
        images, ids = images[valid], ids[valid].cpu()
        anchors, partners = ids[:, 0], ids[:, 1]
        uncertain = torch.from_numpy(self.uncertain[anchors.numpy()])
        mixed = uncertain & (anchors != partners)
        seed = int(torch.randint(2**31, (1,), generator=generator))  # per step: a resumed run draws the same
        lam = torch.from_numpy(np.random.default_rng(seed).beta(self.alpha, self.alpha, size=len(ids))).float() \
            if self.alpha > 0 else torch.full((len(ids),), 0.5)
        if not self.precursor:
            lam = torch.maximum(lam, 1 - lam)  # the anchor dominates
        lam = torch.where(mixed, lam, torch.ones_like(lam))
        num_classes = self.oos.shape[1]
        # ours: an uncertain sample never trains on its given label, its own part is the out-of-sample soft
        # label; the precursor keeps lam * CE(given)
        own = tables.targets.rows(anchors)
        if not self.precursor:
            own = torch.where(uncertain[:, None], torch.from_numpy(self.oos[anchors.numpy()]), own)
            if self.guess is not None:  # the network's current sharpened prediction instead of the fold model's
                own = guessed_targets(model, images[:, 0], own, uncertain, self.guess)
        partner = torch.nn.functional.one_hot(torch.from_numpy(self.labels[partners.numpy()]), num_classes).float()
        targets = lam[:, None] * own + (1 - lam[:, None]) * partner
        lam_x = lam.to(images.device).view(-1, *([1] * (images.dim() - 2)))
        return lam_x * images[:, 0] + (1 - lam_x) * images[:, 1], targets.to(images.device)


def fold_file(run_dir: Path, fold: int) -> Path:
    return run_dir / "selectmix" / f"fold-{fold}.npz"


def load_folds(run_dir: Path, k: int, num_samples: int, num_classes: int) -> np.ndarray | None:
    """The combined out-of-sample probabilities once every fold file exists, else None."""
    files = [fold_file(run_dir, f) for f in range(k)]
    if not all(f.is_file() for f in files):
        return None
    oos = np.full((num_samples, num_classes), np.nan, dtype=np.float32)
    for f in files:
        with np.load(f, allow_pickle=False) as z:
            oos[z["ids"]] = z["probs"]
    return oos


def save_fold(run_dir: Path, fold: int, ids: np.ndarray, probs: np.ndarray) -> None:
    """A finished fold's held-out ids and softmax, written atomically."""
    from data.atomic import atomic_write

    path = fold_file(run_dir, fold)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: np.savez(f, ids=ids, probs=probs))


def uncertainty_metrics(method: SelectMix, true_labels: np.ndarray) -> dict:
    """Uncertain fraction, and precision/recall of the uncertain set against the truly mislabelled set."""
    out = {"uncertain_fraction": float(method.uncertain.mean()), "confident_fraction": float(method.confident.mean())}
    known = true_labels >= 0
    if known.any():
        wrong = (method.labels != true_labels) & known
        hits = (wrong & method.uncertain).sum()
        out["uncertain_precision"] = float(hits / max((method.uncertain & known).sum(), 1))
        out["uncertain_recall"] = float(hits / max(wrong.sum(), 1))
    return out
