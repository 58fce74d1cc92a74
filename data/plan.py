"""Epoch plans: the same ordered sample ids on every rank, split into equal per-rank slices.

`batch_size` is the *global* batch: step s of every rank together reads exactly the ids a single
process would read at step s, so a run's data order does not depend on the number of ranks.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np


def epoch_rng(seed: int, epoch: int, stream: int = 0) -> np.random.Generator:
    """A generator that depends only on (seed, epoch, stream) - identical on every rank."""
    return np.random.default_rng([seed, epoch, stream])


@dataclass(frozen=True)
class EpochPlan:
    """The epoch's ordered sample ids (padded to whole global batches) and how ranks share them."""

    ids: np.ndarray  # [steps * batch_size] int64, sample ids in training order
    batch_size: int  # global batch
    world_size: int

    @property
    def steps(self) -> int:
        return len(self.ids) // self.batch_size

    @cached_property
    def unique_ids(self) -> np.ndarray:
        """Sorted distinct ids of the epoch (what the refresh pass covers). Computed once: every step asks for
        it (random partners), and recomputing it per step made an epoch grow as steps x N."""
        return np.unique(self.ids)

    def batches(self, rank: int) -> list[np.ndarray]:
        """This rank's id batches: its `batch_size // world_size` share of every global batch."""
        local = self.batch_size // self.world_size
        grid = self.ids.reshape(self.steps, self.world_size, local)
        return [grid[s, rank] for s in range(self.steps)]

    def slice(self, rank: int) -> np.ndarray:
        """This rank's training ids in order (all its batches concatenated)."""
        return np.concatenate(self.batches(rank)) if self.steps else self.ids[:0]

    def refresh_slice(self, rank: int) -> np.ndarray:
        """This rank's share of the distinct epoch ids for the refresh pass (sizes differ by <= 1)."""
        return np.array_split(self.unique_ids, self.world_size)[rank]


def check_batch_size(batch_size: int, world_size: int) -> None:
    """The global batch must split evenly over the ranks."""
    if batch_size <= 0 or batch_size % world_size:
        raise ValueError(f"batch_size {batch_size} (global) must be a positive multiple of the "
                         f"{world_size} processes; choose e.g. {max(world_size, batch_size // world_size * world_size)}")


def pad_to_batches(ids: np.ndarray, batch_size: int) -> np.ndarray:
    """Wrap around the start so the list fills whole global batches (no rank gets fewer steps)."""
    missing = (-len(ids)) % batch_size
    if missing == 0:
        return ids
    return np.concatenate([ids, np.resize(ids, missing)])


def full_pass(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """A fresh permutation of all sample ids."""
    return epoch_rng(seed, epoch).permutation(num_samples).astype(np.int64)


def class_balanced_subset(labels: np.ndarray, size: int, seed: int, epoch: int) -> np.ndarray:
    """`size` ids drawn equally per given label, shuffled; a class smaller than its share is taken whole
    as often as it fits, the rest drawn without replacement (every member appears)."""
    rng = epoch_rng(seed, epoch, stream=1)
    classes, counts = np.unique(labels, return_counts=True)
    per_class = np.full(len(classes), size // len(classes))
    per_class[: size % len(classes)] += 1
    by_class = np.split(np.argsort(labels, kind="stable"), np.cumsum(counts)[:-1])  # O(N log N), not O(N x C)
    picks = []
    for members, n in zip(by_class, per_class):
        whole, rest = divmod(int(n), len(members))
        picks += [rng.permutation(members) for _ in range(whole)] + [rng.choice(members, size=rest, replace=False)]
    return rng.permutation(np.concatenate(picks)).astype(np.int64)


def build_epoch_plan(labels: np.ndarray, *, seed: int, epoch: int, batch_size: int, world_size: int,
                     num_batches: int = 0, subset: np.ndarray | None = None) -> EpochPlan:
    """Full shuffled pass (`num_batches=0`) or a class-balanced subset of `num_batches` global batches,
    over all sample ids or only over `subset` (e.g. the training folds of a cross-validation)."""
    check_batch_size(batch_size, world_size)
    labels = np.asarray(labels) if subset is None else np.asarray(labels)[subset]
    if num_batches > 0:
        ids = class_balanced_subset(labels, num_batches * batch_size, seed, epoch)
    else:
        ids = pad_to_batches(full_pass(len(labels), seed, epoch), batch_size)
    return EpochPlan(ids if subset is None else np.asarray(subset, dtype=np.int64)[ids], batch_size, world_size)
