"""Synthetic label noise applied at preparation time (the clean label stays as the true label)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# The MixNN paper's CIFAR-10 pairs: truck->automobile, bird->airplane, deer->horse, cat<->dog.
CIFAR10_ASYMMETRIC = {9: 1, 2: 0, 4: 7, 3: 5, 5: 3}
KINDS = ("symmetric", "asymmetric", "pairflip")


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


def apply_noise(labels: np.ndarray, num_classes: int, spec: NoiseSpec | None, seed: int, dataset: str = "",
                groups: np.ndarray | None = None) -> np.ndarray:
    """Return noisy labels; each label is corrupted with probability `spec.rate`, deterministic in `seed`."""
    labels = np.asarray(labels, dtype=np.int64)
    if spec is None or spec.rate == 0:
        return labels.copy()
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
