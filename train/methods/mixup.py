"""mixup (Zhang et al. 2018): a random partner inside the batch."""
from __future__ import annotations

import torch

from .base import CrossEntropy, beta_draw


def mixup_draws(n: int, alpha: float, generator: torch.Generator) -> tuple[float, torch.Tensor]:
    """(lambda ~ Beta(alpha, alpha), a random partner row for each of n rows), drawn in this order from the
    step's generator: every plain-mixup step draws through here, so they all draw alike."""
    lam = float(beta_draw(alpha, generator))
    return lam, torch.randperm(n, generator=generator)


def mix_in_batch(x: torch.Tensor, y: torch.Tensor, alpha: float, generator: torch.Generator):
    """mixup inside a batch: each row with a random other row of the batch, one lambda ~ Beta(alpha, alpha)
    for the batch (batches under 2 rows pass through)."""
    if len(x) < 2:
        return x, y
    lam, perm = mixup_draws(len(x), alpha, generator)
    perm = perm.to(x.device)
    return lam * x + (1 - lam) * x[perm], lam * y + (1 - lam) * y[perm]


class Mixup(CrossEntropy):
    """mixup: a random partner inside the batch, lambda ~ Beta(alpha, alpha)."""

    name = "mixup"

    def __init__(self, alpha: float = 1.0):
        self.alpha = alpha

    @classmethod
    def from_config(cls, cfg, labels, num_classes, oos=None):
        return cls(cfg.mixup_alpha)

    def inputs_targets(self, batch, tables, generator, model=None):
        x, y = super().inputs_targets(batch, tables, generator)
        return mix_in_batch(x, y, self.alpha, generator)
