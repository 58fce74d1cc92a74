"""GMM clean probability: orientation, normalisation, comm helpers."""
import numpy as np
from conftest import run_distributed

from index.comm import broadcast_array, gather_by_id
from index.gmm import clean_probability, normalise_losses


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
