"""The per-sample tables: refined targets, neighbour pools, and the diagnostics of kNN vs random partners."""
import numpy as np
import pytest
import torch
from types import SimpleNamespace

from train.config import Config
from train.loop import RefreshStats
from train.methods import Tables, sharpen_rows
from train.tables import (anchor_weight_diagnostics, fit_losses, memorisation, neighbour_diagnostics,
                          neighbour_pool, neighbour_table, target_rows)
from train.targets import SoftTargets


def test_refined_targets_follow_the_clean_probability():
    stats = RefreshStats(np.array([0, 1]), np.array([[0.2, 0.8], [0.6, 0.4]], np.float32), np.zeros((2, 1)))
    labels, clean = np.array([0, 0]), np.array([1.0, 0.25], np.float32)
    cfg = Config(target_source="refined", sharpen=1.0)
    assert np.allclose(target_rows(cfg, stats, labels, clean), [[1.0, 0.0], [0.25 + 0.75 * 0.6, 0.75 * 0.4]])
    assert np.allclose(target_rows(Config(), stats, labels, clean), stats.probs)  # Eq. 12's p
    sharp = sharpen_rows(torch.tensor([[0.6, 0.4]]), 0.5)
    assert np.allclose(sharp, [[0.36 / 0.52, 0.16 / 0.52]])
    assert np.allclose(target_rows(Config(sharpen=0.5), stats, labels, clean)[1], sharp[0])  # the same sharpening


def test_neighbour_pools_limit_where_neighbours_come_from():
    # two tight clusters; samples 0 and 3 are judged noisy and must never be found as neighbours
    emb = np.array([[0.0, 0], [0.1, 0], [0.2, 0], [5.0, 0], [5.1, 0], [5.2, 0]], np.float32)
    stats = RefreshStats(np.arange(6), np.zeros((6, 2), np.float32), emb)
    targets = SoftTargets(np.array([0, 0, 0, 1, 1, 0]), 2)  # sample 5's corrected label is 0
    tables = Tables(targets, clean=np.array([0.1, 0.9, 0.9, 0.2, 0.9, 0.9], np.float32))
    cfg = Config(neighbour_pool="clean")
    table, _ = neighbour_table(stats, 6, cfg, *neighbour_pool(cfg, tables))
    assert table[:, 0].tolist() == [1, 2, 1, 4, 5, 4]
    cfg = Config(neighbour_pool="class")
    table, _ = neighbour_table(stats, 6, cfg, *neighbour_pool(cfg, tables))
    assert table[:, 0].tolist() == [1, 2, 1, 4, -1, 2]  # 4: no other clean sample of class 1; 5 searches class 0
    assert neighbour_pool(Config(), tables) == (None, None)


def test_neighbour_diagnostics_by_hand():
    labels = np.array([0, 1, 0, 1])  # given
    true = np.array([0, 0, 0, 1])  # sample 1 is mislabelled (truly 0)
    partners = np.array([[1], [0], [0], [2]])
    out = neighbour_diagnostics(partners, labels, true, np.arange(4))
    # the only mislabelled anchor (1) has neighbour 0: given 0 = its true class, truly clean, same true class
    assert out == {"nn_given_is_anchor_true": 1.0, "nn_chance_given_is_anchor_true": 0.5, "nn_truly_clean": 1.0,
                   "nn_same_true_class": 1.0}  # at chance: 2 of the 4 given labels are 0, the anchor's true class
    partners[1] = 3  # now its neighbour is a clean sample of another class
    out = neighbour_diagnostics(partners, labels, true, np.arange(4))
    assert out["nn_given_is_anchor_true"] == 0.0 and out["nn_same_true_class"] == 0.0


def test_anchor_weight_diagnostics_by_hand():
    labels, true = np.array([0, 1, 1, 1, 0]), np.array([0, 0, 1, 0, 0])  # samples 1 and 3 are mislabelled
    partners = np.array([[0], [0], [3], [4], [-1]])
    clean = np.array([0.9, 0.02, 0.8, 0.0, 0.0])
    out = anchor_weight_diagnostics(partners, clean, labels, true, np.arange(5))
    # anchor 1 (p 0.02) beside a sure-clean neighbour keeps 0.02 / 0.92 of its image: dropped;
    # anchor 3 (p 0) beside another p = 0 sample: equal weights (Eq. 10/11's fallback), kept
    assert out["nn_noisy_anchor_dropped"] == 0.5
    assert out["nn_noisy_anchor_weight"] == pytest.approx((0.02 / 0.92 + 0.5) / 2)
    assert anchor_weight_diagnostics(partners, clean, true, true, np.arange(5)) == {}  # no mislabelled anchor


def test_memorisation_separates_clean_and_mislabelled():
    train = SimpleNamespace(labels=np.array([0, 0, 1, 1]), true_labels=np.array([0, 0, 0, 1]))
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.3, 0.7], [0.4, 0.6]], np.float32)  # predicts 0, 1, 1, 1
    out = memorisation(RefreshStats(np.arange(4), probs, np.zeros((4, 1))), train)
    assert out == {"train_acc_given_truly_clean": pytest.approx(2 / 3), "train_acc_given_truly_noisy": 1.0}


def test_correction_starts_at_the_0_based_epoch_index_e_s():
    from train.config import Config
    from train.tables import correction_due
    cfg = Config(correction_epoch=59, target_update_every=1)  # the paper configs: "from epoch 60" counted from 1
    assert not correction_due(cfg, 58) and correction_due(cfg, 59) and correction_due(cfg, 60)
    assert not any(correction_due(Config(correction_epoch=-1), e) for e in range(300))
    assert [e for e in range(40) if correction_due(Config(correction_epoch=10), e)] == [19, 29, 39]  # MixNN's
    assert correction_due(Config(method="select-correct", correction_epoch=10), 11)  # every epoch


def test_gmm_auto_fits_what_the_method_resolves_to():
    """A Config built in code (never through load_config's check) still fits the method's `auto` GMM: select-correct
    one mixture per class on log-losses, MixNN and DivideMix the paper's one mixture; explicit values are what
    they say."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(2), 200)
    # class 1's losses sit 10x above class 0's; 20% of each class mislabelled (20x its class's loss): one global
    # mixture puts class 0's mislabelled samples (~1.0) with class 1's clean ones and calls them clean
    losses = np.where(labels == 0, 0.05, 0.5) * rng.lognormal(0, 0.3, 400)
    noisy = np.arange(400) % 5 == 0
    losses[noisy] *= 20
    fit = lambda cfg: fit_losses(cfg, losses.astype(np.float32), None, 0, True, labels)[2] > 0.5
    per_class, paper = fit(Config(gmm_split="class", gmm_scale="log")), fit(Config(gmm_split="global", gmm_scale="linear"))
    assert (fit(Config(method="select-correct")) == per_class).all() and (fit(Config()) == paper).all()
    assert (fit(Config(method="dividemix")) == paper).all()
    assert (per_class == ~noisy).all()
    assert paper[noisy & (labels == 0)].all() and (paper[labels == 1] == ~noisy[labels == 1]).all()


def test_target_update_period_moves_targets_only_every_nth_epoch_from_e_s():
    from train.config import Config
    from train.tables import correction_due

    every_epoch = [e for e in range(40) if correction_due(Config(correction_epoch=10, target_update_every=1), e)]
    assert every_epoch == list(range(10, 40))
    authors = [e for e in range(40) if correction_due(Config(correction_epoch=10, target_update_every=10), e)]
    assert authors == [19, 29, 39]  # their 1-based epochs 20, 30, 40: `epoch % 10 == 0` from E_s on
    assert [e for e in range(40) if correction_due(Config(correction_epoch=9, target_update_every=10), e)] == [9, 19, 29, 39]
    assert not any(correction_due(Config(correction_epoch=-1, target_update_every=10), e) for e in range(40))
