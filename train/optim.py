"""Optimiser and learning-rate schedule."""
from __future__ import annotations

import torch

from .config import Config


def create_optimizer(cfg: Config, model):
    """SGD with momentum and cosine annealing with warm restarts (stepped per epoch)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(optimizer, T_0=cfg.restart_period,
                                                                     eta_min=cfg.lr_min)
    return optimizer, scheduler
