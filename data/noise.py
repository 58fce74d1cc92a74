"""Synthetic label noise applied at preparation time (the clean label stays as the true label)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# The MixNN paper's CIFAR-10 pairs: truck->automobile, bird->airplane, deer->horse, cat<->dog.
CIFAR10_ASYMMETRIC = {9: 1, 2: 0, 4: 7, 3: 5, 5: 3}
KINDS = ("symmetric", "asymmetric", "pairflip", "instance")
INSTANCE_STD = 0.1  # std of the per-sample flip rate around R (Xia et al. 2020)


@dataclass(frozen=True)
class NoiseSpec:
    """`kind:rate`, e.g. `symmetric:0.4`."""

    kind: str
    rate: float

    def __str__(self) -> str:
        return f"{self.kind}:{self.rate:g}"


def parse_noise(text: str | None) -> NoiseSpec | None:
    """Parse `--noise symmetric:0.4`; None or 'none' means no synthetic noise."""
    if not text or text == "none":
        return None
    kind, _, rate = text.partition(":")
    if kind not in KINDS or not rate:
        raise ValueError(f"--noise {text!r}: expected one of {', '.join(k + ':RATE' for k in KINDS)}")
    value = float(rate)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"--noise {text!r}: rate must lie in [0, 1]")
    return NoiseSpec(kind, value)


def asymmetric_map(dataset: str, num_classes: int, groups: np.ndarray | None) -> np.ndarray:
    """Class -> class it flips to: CIFAR-10 pairs, CIFAR-100 next class inside its super-class."""
    target = np.arange(num_classes)
    if dataset == "cifar10":
        for src, dst in CIFAR10_ASYMMETRIC.items():
            target[src] = dst
    elif dataset == "cifar100":
        if groups is None:
            raise ValueError("asymmetric CIFAR-100 noise needs the coarse labels of the archive")
        for g in np.unique(groups[groups >= 0]):  # classes absent from the split (-1) never flip
            members = np.unique(np.flatnonzero(groups == g))
            for i, c in enumerate(members):
                target[c] = members[(i + 1) % len(members)]
    else:
        raise ValueError(f"asymmetric noise is defined for cifar10 and cifar100, not {dataset!r}; "
                         "use pairflip:RATE (c -> c+1) instead")
    return target


def instance_flip_probabilities(features: np.ndarray, labels: np.ndarray, num_classes: int, rate: float,
                                rng: np.random.Generator) -> np.ndarray:
    """[n, C] label distribution of instance-dependent noise (Xia et al. 2020, "Part-dependent label
    noise"; the IDN generation of CAL/CORES): flip rate q_i ~ N(rate, 0.1) truncated to [0, 1]; the flip
    mass is spread by softmax(x_i W_{y_i}) over the other classes, W ~ N(0, 1) of shape [C, d, C], x_i
    the sample's normalised pixels; the own class keeps 1 - q_i."""
    from scipy.stats import truncnorm

    n, d = features.shape
    lo, hi = (0 - rate) / INSTANCE_STD, (1 - rate) / INSTANCE_STD
    flip_rate = truncnorm.rvs(lo, hi, loc=rate, scale=INSTANCE_STD, size=n, random_state=rng)
    weights = rng.standard_normal((num_classes, d, num_classes)).astype(np.float32)
    scores = np.empty((n, num_classes), dtype=np.float64)
    for c in np.unique(labels):  # one [n_c, d] x [d, C] product per given class
        members = np.flatnonzero(labels == c)
        scores[members] = features[members] @ weights[c]
    scores[np.arange(n), labels] = -np.inf
    scores -= scores.max(1, keepdims=True)
    soft = np.exp(scores)
    soft /= soft.sum(1, keepdims=True)
    probs = flip_rate[:, None] * soft
    probs[np.arange(n), labels] += 1 - flip_rate
    return probs


def sample_rows(probs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One class per row of a [n, C] distribution (inverse CDF with one uniform draw per row)."""
    cdf = np.cumsum(probs, 1)
    u = rng.random(len(probs))[:, None] * cdf[:, -1:]
    return np.minimum((u >= cdf).sum(1), probs.shape[1] - 1)


def transition_matrix(true_labels: np.ndarray, given: np.ndarray, num_classes: int) -> list[list[float]]:
    """Row-normalised realised transition matrix T[true, given] (rounded), for the manifest."""
    counts = np.zeros((num_classes, num_classes))
    np.add.at(counts, (true_labels, given), 1)
    return np.round(counts / np.maximum(counts.sum(1, keepdims=True), 1), 4).tolist()


def noise_summary(true_labels: np.ndarray, given: np.ndarray, num_classes: int) -> dict:
    """Realised rate and, for up to 100 classes, the transition matrix, over the samples whose true label is
    known (>= 0): what the manifest records of any source of noisy labels."""
    known = true_labels >= 0
    out = {"realised_rate": float((given[known] != true_labels[known]).mean()) if known.any() else None}
    if known.any() and num_classes <= 100:
        out["transition_matrix"] = transition_matrix(true_labels[known], given[known], num_classes)
    return out


def apply_noise(labels: np.ndarray, num_classes: int, spec: NoiseSpec | None, seed: int, dataset: str = "",
                groups: np.ndarray | None = None, features: np.ndarray | None = None) -> np.ndarray:
    """Return noisy labels, deterministic in `seed`. symmetric/asymmetric/pairflip: each label is corrupted
    with probability `spec.rate`; instance: per-sample rates and targets from `features` [n, d] (see
    `instance_flip_probabilities`)."""
    labels = np.asarray(labels, dtype=np.int64)
    if spec is None or spec.rate == 0:
        return labels.copy()
    if spec.kind == "instance":
        if features is None:
            raise ValueError("instance noise needs the images' pixels (features)")
        rng = np.random.default_rng(seed)
        return sample_rows(instance_flip_probabilities(features, labels, num_classes, spec.rate, rng), rng)
    rng = np.random.default_rng(seed)
    flip = rng.random(len(labels)) < spec.rate
    noisy = labels.copy()
    if spec.kind == "symmetric":
        # one of the *other* classes, uniformly
        offset = rng.integers(1, num_classes, size=len(labels))
        noisy[flip] = (labels[flip] + offset[flip]) % num_classes
    elif spec.kind == "pairflip":
        noisy[flip] = (labels[flip] + 1) % num_classes
    else:
        class_groups = None
        if groups is not None:
            class_groups = np.full(num_classes, -1)
            class_groups[labels] = groups
        noisy[flip] = asymmetric_map(dataset, num_classes, class_groups)[labels[flip]]
    return noisy
