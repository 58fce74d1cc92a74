"""Optimiser and learning-rate schedule."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # Config is built on first use (train.config.config_class)
    from .config import Config



def create_optimizer(cfg: Config, model):
    """SGD with momentum and, stepped per epoch, cosine annealing with warm restarts (MixNN) or a step
    schedule (`lr_schedule: step`: lr x lr_gamma at each epoch of `lr_steps`, as DivideMix's scripts).
    DivideMix's two networks share one optimizer: a step trains one of them, the other has no gradients,
    and SGD leaves parameters without a gradient untouched (momentum and weight decay included)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.lr_schedule == "step":
        return optimizer, torch.optim.lr_scheduler.MultiStepLR(optimizer, [int(e) for e in cfg.lr_steps],
                                                               gamma=cfg.lr_gamma)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(optimizer, T_0=cfg.restart_period,
                                                                     eta_min=cfg.lr_min)
    return optimizer, scheduler
