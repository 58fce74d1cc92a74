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


def test_instance_noise_rate_per_sample_and_determinism():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 300)
    features = rng.normal(size=(len(labels), 64)).astype(np.float32) + labels[:, None] * 0.1
    spec = parse_noise("instance:0.4")
    noisy = apply_noise(labels, 10, spec, seed=5, features=features)
    assert abs((noisy != labels).mean() - 0.4) < 0.03  # per-sample rates ~ N(0.4, 0.1) truncated to [0, 1]
    assert (apply_noise(labels, 10, spec, seed=5, features=features) == noisy).all()
    assert (apply_noise(labels, 10, spec, seed=6, features=features) != noisy).any()
    # instance-dependent: the flip target depends on the pixels, so a class's flips concentrate on few classes
    # (far from the uniform spread of symmetric noise)
    from data.noise import instance_flip_probabilities, transition_matrix

    probs = instance_flip_probabilities(features, labels, 10, 0.4, np.random.default_rng(1))
    assert np.allclose(probs.sum(1), 1) and (probs >= 0).all()
    assert np.allclose(probs[np.arange(len(labels)), labels], 1 - (1 - probs[np.arange(len(labels)), labels]))
    t = np.array(transition_matrix(labels, noisy, 10))
    assert np.allclose(t.sum(1), 1, atol=1e-3) and abs(np.diag(t).mean() - 0.6) < 0.03
    with pytest.raises(ValueError, match="pixels"):
        apply_noise(labels, 10, spec, seed=5)
