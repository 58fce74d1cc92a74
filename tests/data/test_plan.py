"""Epoch plans: determinism, per-rank equality of steps, class balance, data order independent of ranks."""
import numpy as np
import pytest

from data.plan import build_epoch_plan


def test_full_pass_deterministic_and_covers_all():
    labels = np.arange(103) % 10
    a = build_epoch_plan(labels, seed=3, epoch=2, batch_size=8, world_size=2)
    b = build_epoch_plan(labels, seed=3, epoch=2, batch_size=8, world_size=2)
    assert np.array_equal(a.ids, b.ids)
    assert not np.array_equal(a.ids, build_epoch_plan(labels, seed=3, epoch=3, batch_size=8, world_size=2).ids)
    assert set(a.ids.tolist()) == set(range(103)) and len(a.ids) == 104 and a.steps == 13
    r0, r1 = a.batches(0), a.batches(1)
    assert len(r0) == len(r1) == 13 and all(len(x) == len(y) == 4 for x, y in zip(r0, r1))
    # step s of both ranks together is the single-process global batch s
    single = build_epoch_plan(labels, seed=3, epoch=2, batch_size=8, world_size=1).batches(0)
    assert all(sorted(np.concatenate([x, y])) == sorted(z) for x, y, z in zip(r0, r1, single))
    refresh = np.concatenate([a.refresh_slice(0), a.refresh_slice(1)])
    assert np.array_equal(refresh, np.arange(103))


def test_class_balanced_subset():
    labels = np.concatenate([np.zeros(900), np.ones(90), np.full(10, 2)]).astype(int)
    plan = build_epoch_plan(labels, seed=0, epoch=0, batch_size=6, world_size=2, num_batches=50)
    assert len(plan.ids) == 300
    assert np.bincount(labels[plan.ids]).tolist() == [100, 100, 100]
    assert len(np.unique(plan.ids[labels[plan.ids] == 1])) == 90  # drawn without replacement when possible
    assert len(plan.slice(0)) == len(plan.slice(1)) == 150


def test_class_balanced_subset_draws_as_the_per_class_scan_did():
    """Grouping by one argsort (O(N log N)) gives each class's members in the same order as scanning for
    them class by class (O(N x C)), so the draw and every run's data order are unchanged."""
    from data.plan import class_balanced_subset, epoch_rng

    labels = np.random.default_rng(0).integers(0, 7, 5000)
    labels[labels == 3] = 2  # a class without members
    rng = epoch_rng(1, 4, stream=1)
    classes = np.unique(labels)
    picks = []
    for c, n in zip(classes, [600 // len(classes) + (i < 600 % len(classes)) for i in range(len(classes))]):
        members = np.flatnonzero(labels == c)
        whole, rest = divmod(int(n), len(members))
        picks += [rng.permutation(members) for _ in range(whole)] + [rng.choice(members, size=rest, replace=False)]
    expected = rng.permutation(np.concatenate(picks))
    assert np.array_equal(class_balanced_subset(labels, 600, seed=1, epoch=4), expected)


def test_batch_size_must_split():
    with pytest.raises(ValueError, match="multiple of the 2 processes"):
        build_epoch_plan(np.zeros(10, int), seed=0, epoch=0, batch_size=7, world_size=2)
