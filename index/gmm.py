"""Clean probability of every sample from its loss: a 2-component Gaussian mixture (scikit-learn).

cuML ships no Gaussian mixture model, and scikit-learn fits 1M one-dimensional losses in well under a
second, so the fit runs on the CPU on one rank and the result is broadcast.
"""
from __future__ import annotations

from dataclasses import dataclass

import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture


@dataclass
class CleanFit:
    """Result of the fit: P(clean | loss) per input row, and the mixture parameters (clean first)."""

    prob: np.ndarray  # [n] float32 in [0, 1]
    means: tuple[float, float]  # (clean, noisy) on the min-max normalised scale
    weights: tuple[float, float]
    stds: tuple[float, float] = (0.0, 0.0)
    normalised: np.ndarray | None = None  # [n] the min-max normalised losses the mixture was fit on
    scale: str = "linear"  # linear: losses; log: log-losses (both min-max normalised)


def normalise_losses(losses: np.ndarray) -> np.ndarray:
    """Min-max normalise to [0, 1] (a constant vector maps to zeros)."""
    losses = np.asarray(losses, dtype=np.float64)
    lo, hi = losses.min(), losses.max()
    return (losses - lo) / (hi - lo) if hi > lo else np.zeros_like(losses)


def scaled_losses(losses: np.ndarray, scale: str = "linear") -> np.ndarray:
    """The values the mixture is fit on: min-max normalised losses, or log-losses (log(loss + 1e-4), which
    turns the long right tail of cross-entropy into a roughly Gaussian bump) min-max normalised."""
    losses = np.asarray(losses, dtype=np.float64)
    return normalise_losses(np.log(np.maximum(losses, 0) + 1e-4) if scale == "log" else losses)


def clean_probability(losses: np.ndarray, *, max_iter: int = 10, tol: float = 1e-2, reg_covar: float = 5e-4,
                      seed: int = 0, scale: str = "linear") -> CleanFit:
    """Fit the mixture on min-max normalised (log-)losses; the component with the smaller mean is clean."""
    x = scaled_losses(losses, scale)
    prob, means, weights, stds = fit_mixture(x, max_iter, tol, reg_covar, seed)
    return CleanFit(prob, means, weights, stds, x.astype(np.float32), scale)


def fit_mixture(x: np.ndarray, max_iter: int, tol: float, reg_covar: float,
                seed: int) -> tuple[np.ndarray, tuple, tuple, tuple]:
    """2-component 1-d GMM on `x`: (P(clean) [n], means, weights, stds), clean (smaller mean) first."""
    gmm = GaussianMixture(n_components=2, max_iter=max_iter, tol=tol, reg_covar=reg_covar, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # max_iter=10 is the recipe, not a failure
        gmm.fit(x.reshape(-1, 1))
    clean = int(gmm.means_.argmin())  # scikit-learn orders components arbitrarily
    order = [clean, 1 - clean]
    prob = gmm.predict_proba(x.reshape(-1, 1))[:, clean].astype(np.float32)
    stds = np.sqrt(gmm.covariances_.reshape(2))
    return (prob, tuple(float(gmm.means_[i, 0]) for i in order), tuple(float(gmm.weights_[i]) for i in order),
            tuple(float(stds[i]) for i in order))


def clean_probability_by_class(losses: np.ndarray, labels: np.ndarray, *, scale: str = "log", min_samples: int = 20,
                               max_iter: int = 10, tol: float = 1e-2, reg_covar: float = 5e-4,
                               seed: int = 0) -> CleanFit:
    """One mixture per label (the label each loss was computed against) on the (log-)losses scaled over the
    whole set: a class the network finds hard no longer counts as noisy as a whole, and the split adapts to
    each class's own noise rate. Classes with fewer than `min_samples` samples take the mixture fit on all.
    The means, stds and weights reported are the moments of the samples weighted by P(clean) and 1 - P(clean)
    (a summary; there is one mixture per class)."""
    x = scaled_losses(losses, scale)
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    prob = np.empty(len(x), np.float32)
    if (counts < min_samples).any():  # the mixture over all samples, only where a class needs it
        small = np.isin(labels, classes[counts < min_samples])
        prob[small] = fit_mixture(x, max_iter, tol, reg_covar, seed)[0][small]
    for c in classes[counts >= min_samples]:
        rows = labels == c
        prob[rows] = fit_mixture(x[rows], max_iter, tol, reg_covar, seed)[0]
    w = np.stack([prob, 1 - prob]).astype(np.float64)
    mass = np.maximum(w.sum(1), 1e-12)
    means = (w @ x) / mass
    stds = np.sqrt(np.maximum((w @ x**2) / mass - means**2, 0))
    return CleanFit(prob, (float(means[0]), float(means[1])), (float(mass[0] / len(x)), float(mass[1] / len(x))),
                    (float(stds[0]), float(stds[1])), x.astype(np.float32), scale)
