"""Metrics of the per-sample tables against the true labels (when the data set knows them)."""
from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score


def topk_correct(logits: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """[n] bool: the label is among the k highest logits."""
    k = min(k, logits.shape[1])
    top = np.argpartition(-logits, k - 1, axis=1)[:, :k]
    return (top == labels[:, None]).any(1)


def label_correction_accuracy(corrected: np.ndarray, true_labels: np.ndarray, ids: np.ndarray) -> float | None:
    """Fraction of the given ids with argmax t == true label (the paper's Table V); None if unknown."""
    known = ids[true_labels[ids] >= 0]
    return float((corrected[known] == true_labels[known]).mean()) if len(known) else None


def noise_detection(clean_prob: np.ndarray, labels: np.ndarray, true_labels: np.ndarray, ids: np.ndarray) -> dict:
    """Precision / recall / AUC of 'believed noisy' (P(clean) < 0.5) against 'truly mislabelled'."""
    known = ids[(true_labels[ids] >= 0) & ~np.isnan(clean_prob[ids])]
    if len(known) == 0:
        return {}
    noisy = labels[known] != true_labels[known]
    believed = clean_prob[known] < 0.5
    hits = (noisy & believed).sum()
    out = {"noise_precision": float(hits / max(believed.sum(), 1)), "noise_recall": float(hits / max(noisy.sum(), 1))}
    p, r = out["noise_precision"], out["noise_recall"]
    out["noise_f1"] = 2 * p * r / (p + r) if p + r else 0.0
    if 0 < noisy.sum() < len(noisy):
        out["noise_auc"] = float(roc_auc_score(noisy, 1.0 - clean_prob[known]))
    return out


def neighbour_agreement(partners: np.ndarray, labels: np.ndarray, ids: np.ndarray) -> float:
    """Fraction of (sample, neighbour) pairs of the given ids whose labels agree."""
    nb = partners[ids]
    ok = nb >= 0
    return float((labels[nb[ok]] == np.broadcast_to(labels[ids][:, None], nb.shape)[ok]).mean()) if ok.any() else 0.0
