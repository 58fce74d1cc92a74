"""Synthetic label noise: rates, allowed targets, determinism."""
import numpy as np
import pytest

from data.noise import apply_noise, parse_noise


def test_symmetric_never_keeps_flipped_label_and_hits_rate():
    labels = np.repeat(np.arange(10), 1000)
    noisy = apply_noise(labels, 10, parse_noise("symmetric:0.4"), seed=1)
    assert abs((noisy != labels).mean() - 0.4) < 0.02
    flipped = noisy[noisy != labels]
    assert np.bincount(flipped, minlength=10).min() > 300  # spread over all classes
    assert (apply_noise(labels, 10, parse_noise("symmetric:0.4"), seed=1) == noisy).all()
    assert (apply_noise(labels, 10, parse_noise("symmetric:0.4"), seed=2) != noisy).any()


def test_pairflip_and_bad_specs():
    labels = np.arange(10)
    assert (apply_noise(labels, 10, parse_noise("pairflip:1"), 0) == (labels + 1) % 10).all()
    assert parse_noise("none") is None
    with pytest.raises(ValueError, match="expected one of"):
        parse_noise("uniform:0.2")
    with pytest.raises(ValueError, match="pairflip"):
        apply_noise(labels, 10, parse_noise("asymmetric:0.4"), 0, dataset="digits")
