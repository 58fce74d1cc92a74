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


def normalise_losses(losses: np.ndarray) -> np.ndarray:
    """Min-max normalise to [0, 1] (a constant vector maps to zeros)."""
    losses = np.asarray(losses, dtype=np.float64)
    lo, hi = losses.min(), losses.max()
    return (losses - lo) / (hi - lo) if hi > lo else np.zeros_like(losses)


def clean_probability(losses: np.ndarray, *, max_iter: int = 10, tol: float = 1e-2, reg_covar: float = 5e-4,
                      seed: int = 0) -> CleanFit:
    """Fit the mixture on min-max normalised losses; the component with the smaller mean is clean."""
    x = normalise_losses(losses).reshape(-1, 1)
    gmm = GaussianMixture(n_components=2, max_iter=max_iter, tol=tol, reg_covar=reg_covar, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # max_iter=10 is the recipe, not a failure
        gmm.fit(x)
    clean = int(gmm.means_.argmin())  # scikit-learn orders components arbitrarily
    noisy = 1 - clean
    prob = gmm.predict_proba(x)[:, clean].astype(np.float32)
    stds = np.sqrt(gmm.covariances_.reshape(2))
    return CleanFit(prob, (float(gmm.means_[clean, 0]), float(gmm.means_[noisy, 0])),
                    (float(gmm.weights_[clean]), float(gmm.weights_[noisy])), (float(stds[clean]), float(stds[noisy])),
                    x[:, 0].astype(np.float32))
