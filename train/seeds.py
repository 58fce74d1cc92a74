"""Every random stream of a run, derived in one place from (seed, epoch, rank, step, network).

A stream is a pure function of those numbers, so a run resumed at any step draws exactly what it would have
drawn; no formula is written twice. The epoch's id order (data.plan.build_epoch_plan) is seeded by
(seed, epoch) itself.
"""
from __future__ import annotations

import numpy as np
import torch

from data.plan import epoch_rng


def rank_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of one rank's training pass: its loader's augmentation draws and, per step, its mixing draws."""
    return (seed * 1_000_003 + epoch) * 1009 + rank


def step_generator(pass_seed: int, step: int) -> torch.Generator:
    """The mixing draws (lambda, permutations, random weights) of one training step of a pass."""
    return torch.Generator().manual_seed(pass_seed * 100_003 + step)


def partner_rng(seed: int, epoch: int, rank: int) -> np.random.Generator:
    """Random partners drawn by id for this rank's anchors (random-partner MixNN, SelectMix)."""
    return epoch_rng(seed, epoch, stream=2 + rank)


def network_seed(seed: int, net: int) -> int:
    """The id-order seed of network `net`'s own pass in a two-network method (0-based net)."""
    return seed + 7919 * (net + 1)


def network_rng(seed: int, epoch: int, net: int) -> np.random.Generator:
    """Network `net`'s draws of an epoch (the order of its unlabelled ids in a two-network method)."""
    return epoch_rng(seed, epoch, stream=10 + net)


def gmm_seed(seed: int, epoch: int, net: int = 0) -> int:
    """The Gaussian mixture's initialisation of an epoch's refresh (one mixture per network: `net`)."""
    return seed + epoch + 7919 * net


def fold_seed(seed: int, fold: int) -> int:
    """The initial weights of a cross-validation fold's model."""
    return seed * 1000 + fold
