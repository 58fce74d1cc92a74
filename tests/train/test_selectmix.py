"""SelectMix: folds, the uncertain/confident split, class-aware partners, soft-label targets, resumable stage."""
import subprocess
import sys

import numpy as np
import torch
from conftest import REPO

from train.methods import Tables
from train.methods.selectmix import SelectMix, split_uncertain, stratified_folds
from train.targets import SoftTargets


def test_stratified_folds_balance_classes_and_are_deterministic():
    labels = np.repeat(np.arange(3), 50)
    folds = stratified_folds(labels, 5, seed=0)
    assert np.array_equal(folds, stratified_folds(labels, 5, seed=0))
    for c in range(3):
        assert np.bincount(folds[labels == c], minlength=5).tolist() == [10] * 5


def test_uncertain_and_confident_by_hand():
    oos = np.array([[0.9, 0.1], [0.3, 0.7], [0.55, 0.45], [0.6, 0.4]], np.float32)
    labels = np.array([0, 0, 0, 1])
    uncertain, confident = split_uncertain(oos, labels, threshold=0.5, confident=0.8)
    assert uncertain.tolist() == [False, True, False, True]  # 1: prediction differs; 3: p(given)=0.4
    assert confident.tolist() == [True, False, False, False]  # 2 is neither: p(given)=0.55 < 0.8
    cl_uncertain, _ = split_uncertain(np.tile(oos, (10, 1)), np.tile(labels, 10), threshold=0.5, confident=0.8,
                                      rule="cleanlab")
    assert cl_uncertain.dtype == bool and cl_uncertain[1::4].all()


def test_cleanlab_rules_never_fork_a_worker_pool(monkeypatch):
    """cleanlab's default n_jobs forks a multiprocessing pool, which can hang a training process for good; both
    users of find_label_issues (SelectMix's `cleanlab` rule, Confident Learning) must run it in-process."""
    import multiprocessing

    from train.methods.select import ConfidentLearning

    def no_pool(*args, **kwargs):
        raise AssertionError("find_label_issues forked a multiprocessing pool")

    monkeypatch.setattr(multiprocessing, "Pool", no_pool)
    monkeypatch.setattr(multiprocessing, "cpu_count", lambda: 4)  # cleanlab's fallback when psutil is absent
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 400)
    oos = rng.dirichlet(np.ones(3), len(labels)).astype(np.float32)
    oos[np.arange(len(labels)), labels] += 1.0
    oos /= oos.sum(1, keepdims=True)
    oos[:40] = oos[:40, ::-1]  # a few confidently wrong given labels
    uncertain, _ = split_uncertain(oos, labels, threshold=0.5, confident=0.8, rule="cleanlab")
    assert uncertain[:40].mean() > 0.5 > uncertain[40:].mean()
    assert np.array_equal(ConfidentLearning(oos, labels).issues, uncertain)


def test_partners_come_from_the_predicted_class_and_targets_mix_soft_labels():
    oos = np.array([[0.9, 0.1], [0.95, 0.05], [0.1, 0.9], [0.2, 0.8]], np.float32)
    labels = np.array([0, 0, 1, 0])  # sample 3 is labelled 0 but predicted 1
    method = SelectMix(oos, labels, alpha=1.0)
    assert method.uncertain.tolist() == [False, False, False, True]
    partners = method.partner_ids(np.array([0, 3]), None, None, np.random.default_rng(0))
    assert partners.tolist() == [[0], [2]]  # 2 is the only confident sample of class 1
    batch = {"images": torch.tensor([0.0, 3.0, 0.0, 2.0]).view(4, 1, 1, 1), "ids": torch.tensor([0, 3, 0, 2]),
             "valid": torch.ones(4, dtype=torch.bool)}
    tables = Tables(SoftTargets(labels, 2))
    torch.manual_seed(0)
    x, y = method.inputs_targets(batch, tables, torch.Generator())
    assert x[0].abs().sum() == 0 and torch.allclose(y[0], torch.tensor([1.0, 0.0]))
    lam = (x[1].item() - 2.0) / (3.0 - 2.0)
    assert 0.5 <= lam <= 1.0
    expected = lam * torch.tensor([0.2, 0.8]) + (1 - lam) * torch.tensor([0.0, 1.0])
    assert torch.allclose(y[1], expected, atol=1e-5)


def test_stage_is_resumable_per_fold(tmp_path, digits_shards):
    run = tmp_path / "runs" / "sm"
    (run / "selectmix").mkdir(parents=True)
    folds = stratified_folds(__import__("data.reader", fromlist=["x"]).ShardDataset(digits_shards / "train").labels,
                             2, 0)
    held = np.flatnonzero(folds == 0)
    marker = np.full((len(held), 10), 0.1, np.float32)
    np.savez(run / "selectmix" / "fold-0.npz", ids=held, probs=marker)
    before = (run / "selectmix" / "fold-0.npz").read_bytes()
    cmd = [sys.executable, str(REPO / "train" / "main.py"), "--data", str(digits_shards), "--method", "selectmix",
           "--cv_folds", "2", "--cv_epochs", "1", "--epochs", "1", "--warmup_epochs", "0", "--output",
           str(tmp_path / "runs"), "--run_name", "sm", "--progress", "false",
           "--selectmix_rule", "mismatch"]  # p(given) = 0.1 < 0.5 flags every sample of the marker fold
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run / "selectmix" / "fold-0.npz").read_bytes() == before  # a finished fold is not retrained
    assert "fold 1/2" not in result.stderr and "fold 2/2" in result.stderr
    with np.load(run / "selectmix" / "fold-1.npz") as z:
        assert set(z["ids"].tolist()) == set(np.flatnonzero(folds == 1).tolist())
        assert np.allclose(z["probs"].sum(1), 1, atol=1e-4)
    import csv
    row = list(csv.DictReader((run / "summary.csv").open()))[0]
    assert float(row["uncertain_fraction"]) >= 0.5 and float(row["uncertain_recall"]) > 0  # fold 0: p=0.1 each


def test_fold_models_and_optimizers_are_released(tmp_path, digits_shards):
    import gc

    from accelerate import Accelerator

    from train.config import load_config
    from train.crossval import out_of_sample_probabilities
    from train.dataset import load_data
    from train.models import SmallCNN

    cfg = load_config(["--data", str(digits_shards), "--cv_folds", "2", "--cv_epochs", "1", "--progress", "false"])
    accelerator = Accelerator(cpu=True)
    probs = out_of_sample_probabilities(cfg, load_data(cfg, accelerator), accelerator, tmp_path, 10)
    assert probs.shape == (1294, 10) and np.allclose(probs.sum(1), 1, atol=1e-4)
    gc.collect()
    alive = [o for o in gc.get_objects() if type(o) in (SmallCNN, torch.optim.SGD)]
    assert not alive
