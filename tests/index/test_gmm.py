"""GMM clean probability: orientation, normalisation, comm helpers."""
import numpy as np
from conftest import run_distributed

from index.comm import broadcast_array, gather_by_id
from index.gmm import clean_probability, clean_probability_by_class, normalise_losses


def test_clean_component_is_the_low_loss_one_whatever_the_order():
    rng = np.random.default_rng(0)
    losses = np.concatenate([rng.normal(0.2, 0.05, 700), rng.normal(2.0, 0.3, 300)])
    for seed in range(4):  # different initialisations give different component orders
        fit = clean_probability(losses, seed=seed)
        assert fit.prob[:700].mean() > 0.95 and fit.prob[700:].mean() < 0.05
        assert fit.means[0] < fit.means[1] and abs(fit.weights[0] - 0.7) < 0.05


def test_normalise_constant():
    assert normalise_losses(np.ones(5)).tolist() == [0] * 5
    assert normalise_losses(np.array([1.0, 3.0, 2.0])).tolist() == [0, 1, 0.5]


def comm_child(rank):
    ids = np.array([[0, 2, 4], [1, 3]][rank])
    table = gather_by_id(ids, ids.astype(np.float32) * 10, 6)
    shared = broadcast_array(np.arange(3) if rank == 1 else None, src=1)
    return table, shared


def test_gather_by_id_and_broadcast(tmp_path):
    for table, shared in run_distributed(comm_child, 2, tmp_path=tmp_path):
        assert table[:5].tolist() == [0, 10, 20, 30, 40] and np.isnan(table[5])
        assert shared.tolist() == [0, 1, 2]


def test_one_mixture_per_class_finds_each_class_its_own_split():
    """Class 0 is easy (clean losses ~0.02) and 40% noisy, class 1 hard (its clean losses are as high as
    class 0's noisy ones) and 60% noisy: one global mixture cannot tell class 1's clean samples from class 0's
    noisy ones; one mixture per class on log-losses recovers both classes' noise."""
    rng = np.random.default_rng(0)
    parts = [(0, False, rng.lognormal(np.log(0.02), 0.5, 600)), (0, True, rng.lognormal(np.log(1.5), 0.3, 400)),
             (1, False, rng.lognormal(np.log(1.5), 0.3, 400)), (1, True, rng.lognormal(np.log(6.0), 0.3, 600))]
    labels = np.concatenate([np.full(len(x), c) for c, _, x in parts])
    noisy = np.concatenate([np.full(len(x), n) for _, n, x in parts])
    losses = np.concatenate([x for _, _, x in parts])
    by_class = clean_probability_by_class(losses, labels, scale="log")
    glob = clean_probability(losses)
    accuracy = lambda prob: ((prob > 0.5) == ~noisy).mean()  # noqa: E731
    assert accuracy(by_class.prob) > 0.97 and accuracy(glob.prob) < 0.85
    for c, rate in [(0, 0.4), (1, 0.6)]:
        assert abs((by_class.prob[labels == c] < 0.5).mean() - rate) < 0.03
    assert by_class.scale == "log" and by_class.means[0] < by_class.means[1]
    assert abs(by_class.weights[0] - (~noisy).mean()) < 0.03 and abs(sum(by_class.weights) - 1) < 1e-6


def test_a_class_too_small_for_its_own_mixture_takes_the_global_one():
    rng = np.random.default_rng(1)
    losses = np.concatenate([rng.normal(0.2, 0.05, 700), rng.normal(2.0, 0.3, 300), [0.2, 2.0]])
    labels = np.array([0] * 1000 + [1, 1])
    fit = clean_probability_by_class(losses, labels, scale="linear", min_samples=20)
    assert fit.prob[-2] > 0.9 and fit.prob[-1] < 0.1
