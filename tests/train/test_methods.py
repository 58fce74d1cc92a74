"""Eq. 4, 5, 7, 10, 11, 12 against hand-computed numbers; method batches; soft-target storage."""
import math

import numpy as np
import pytest
import torch

from train.methods import MixNN, Tables, clean_weights, create_method, group_rows, mix_groups, soft_cross_entropy
from train.targets import SoftTargets


def test_eq10_11_clean_weights():
    w = clean_weights(torch.tensor([[0.9, 0.3], [0.0, 0.0], [0.2, 0.2]]))
    assert torch.allclose(w[0], torch.tensor([0.75, 0.25]), atol=1e-6)
    assert torch.allclose(w[1], torch.tensor([0.5, 0.5]))  # all ~0: equal weights
    assert torch.allclose(w.sum(1), torch.ones(3))


def test_eq4_5_mixing():
    images = torch.tensor([[[1.0, 2.0], [3.0, 6.0]]])  # one group: sample + 1 neighbour, 2 "pixels"
    targets = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    x, y = mix_groups(images, targets, torch.tensor([[0.75, 0.25]]))
    assert torch.allclose(x, torch.tensor([[1.5, 3.0]])) and torch.allclose(y, torch.tensor([[0.75, 0.25]]))


def test_eq7_soft_cross_entropy():
    logits = torch.tensor([[math.log(3.0), 0.0]])  # softmax = (0.75, 0.25)
    loss = soft_cross_entropy(logits, torch.tensor([[0.5, 0.5]]))
    assert loss.item() == pytest.approx(-(0.5 * math.log(0.75) + 0.5 * math.log(0.25)), rel=1e-6)


@pytest.mark.parametrize("topk", [0, 2])
def test_eq12_ema_soft_targets(topk):
    t = SoftTargets(np.array([0, 2]), num_classes=3, topk=topk)
    assert t.rows([1]).tolist() == [[0, 0, 1]]
    probs = torch.tensor([[0.0, 1.0, 0.0], [0.1, 0.15, 0.75]])
    t.assign([0, 1], t.ema_rows([0, 1], probs, 0.9))
    assert torch.allclose(t.rows([0]), torch.tensor([[0.9, 0.1, 0.0]]), atol=1e-3)
    expected = torch.tensor([0.01, 0.015, 0.975]) if not topk else torch.tensor([0.0, 0.015, 0.975]) / 0.99
    assert torch.allclose(t.rows([1])[0], expected, atol=2e-3)
    for _ in range(30):  # keeps moving toward p: the corrected label flips
        t.assign([0], t.ema_rows([0], probs[:1], 0.9))
    assert t.corrected().tolist() == [1, 2]
    assert t.bytes_per_sample == (6 if not topk else 12)


def dense_topk_ema(t: SoftTargets, ids, probs: torch.Tensor, momentum: float) -> torch.Tensor:
    """The top-k EMA as first written: dense rows, then the k largest (the reference for the sparse path)."""
    values, classes = (momentum * t.rows(ids) + (1 - momentum) * probs).topk(t.topk, dim=1)
    values = values / values.sum(1, keepdim=True).clamp_min(1e-12)
    return torch.cat([classes.float(), values.half().float()], dim=1)


def test_topk_ema_without_dense_rows_equals_the_dense_computation():
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 50, (300,), generator=gen).numpy()
    sparse, dense = SoftTargets(labels, 50, topk=4), SoftTargets(labels, 50, topk=4)
    ids = np.arange(300)
    for epoch in range(6):  # t's slots and p's top classes overlap more and more as the EMA converges
        logits = torch.randn(300, 50, generator=gen)
        logits[torch.arange(300), torch.from_numpy(labels)] += 2.0 * epoch
        probs = torch.softmax(logits, 1)
        got, want = sparse.ema_rows(ids, probs, 0.7), dense_topk_ema(dense, ids, probs, 0.7)
        # the same values in the same order; classes may differ only where values tie exactly
        assert torch.equal(got[:, 4:], want[:, 4:])
        assert (got[:, :4] == want[:, :4]).float().mean() > 0.999
        sparse.assign(ids, got)
        dense.assign(ids, want)
    assert torch.allclose(sparse.rows(ids), dense.rows(ids))


@pytest.mark.parametrize("topk", [0, 3])
def test_corrected_labels_follow_every_assign_and_restore(topk):
    labels = np.array([0, 1, 2, 3, 4, 0])
    t = SoftTargets(labels, 5, topk=topk)
    assert t.corrected().tolist() == labels.tolist()
    probs = torch.full((2, 5), 0.01)
    probs[:, 4] = 0.96
    for _ in range(20):
        t.assign([1, 5], t.ema_rows([1, 5], probs, 0.5))
    assert t.corrected().tolist() == [0, 4, 2, 3, 4, 4]
    assert np.array_equal(t.corrected(), t.argmax())  # the kept labels are argmax t of the stored rows
    u = SoftTargets(labels, 5, topk=topk)
    u.load_state_dict(t.state_dict())
    assert u.corrected().tolist() == [0, 4, 2, 3, 4, 4]
    kept = t.corrected()
    kept[0] = 3  # a copy: callers cannot change the table
    assert t.corrected()[0] == 0


def test_soft_targets_state_round_trip():
    t = SoftTargets(np.array([1, 0]), 2)
    u = SoftTargets(np.array([0, 0]), 2)
    u.load_state_dict(t.state_dict())
    assert torch.equal(u.values, t.values)
    with pytest.raises(ValueError, match="targets_topk"):
        SoftTargets(np.array([0]), 2, topk=1).load_state_dict(t.state_dict())


def fake_batch(ids, valid=None):
    ids = torch.tensor(ids)
    return {"images": ids.float().view(-1, 1, 1, 1).repeat(1, 1, 2, 2), "ids": ids, "labels": ids,
            "valid": torch.ones(len(ids), dtype=torch.bool) if valid is None else torch.tensor(valid)}


def test_mixnn_batch_uses_neighbour_ids_and_clean_weights():
    targets = SoftTargets(np.array([0, 1, 2, 3]), 4)
    tables = Tables(targets, clean=np.array([0.9, 0.3, 0.0, 0.5], np.float32),
                    partners=np.array([[1], [0], [3], [-1]]))
    method = MixNN(k=1)
    anchors = np.array([0, 2, 3])
    partners = method.partner_ids(anchors, tables, np.arange(4), np.random.default_rng(0))
    assert partners.tolist() == [[1], [3], [3]]  # no neighbour: itself
    batch = fake_batch(np.concatenate([anchors, partners[:, 0]]).tolist(), [True, True, True, True, False, True])
    x, y = method.inputs_targets(batch, tables, torch.Generator())
    assert len(x) == 2  # the group whose neighbour failed to decode is dropped
    assert torch.allclose(x[:, 0, 0, 0], torch.tensor([0.75 * 0 + 0.25 * 1, 3.0]))
    assert torch.allclose(y[0], torch.tensor([0.75, 0.25, 0, 0]))


def test_group_rows_layout():
    images, ids, valid = group_rows(fake_batch([0, 1, 2, 10, 11, 12, 20, 21, 22]), 2)
    assert ids.tolist() == [[0, 10, 20], [1, 11, 21], [2, 12, 22]] and valid.all()


def test_random_weights_and_partners_ablations():
    tables = Tables(SoftTargets(np.zeros(5, int), 2), clean=np.ones(5, np.float32), partners=np.zeros((5, 2), int))
    method = MixNN(k=2, weights="random", partners="random")
    partners = method.partner_ids(np.arange(3), tables, np.array([3, 4]), np.random.default_rng(0))
    assert set(partners.flatten().tolist()) <= {3, 4}
    w = method.group_weights(torch.zeros(4, 3, dtype=torch.long), tables, torch.Generator().manual_seed(0))
    assert torch.allclose(w.sum(1), torch.ones(4)) and w.std() > 0.05


def test_create_method_rejects_unknown_and_needs_folds():
    class C:
        method, k, weights, partners, mixup_alpha = "dividemix2", 1, "clean", "knn", 1.0
    with pytest.raises(ValueError, match="expected one of ce, mixup, mixnn"):
        create_method(C())
    C.method = "selectmix"
    with pytest.raises(ValueError, match="out-of-sample"):
        create_method(C(), np.zeros(3, int), 2)


def test_beta_weights_keep_the_anchor_dominant_and_follow_the_generator():
    from train.methods.mixnn import beta_weights

    w = beta_weights(500, 3, 1.0, torch.Generator().manual_seed(4))
    assert torch.allclose(w.sum(1), torch.ones(500)) and (w[:, 0] >= 0.5).all()
    assert torch.allclose(w[:, 1], w[:, 2]) and w[:, 0].std() > 0.1  # neighbours share the rest; lam varies
    assert torch.equal(w, beta_weights(500, 3, 1.0, torch.Generator().manual_seed(4)))


def test_select_trains_on_clean_ids_and_select_correct_targets():
    from train.methods import SelectCorrect, Select

    targets = SoftTargets(np.array([0, 1, 1]), 2)
    targets.assign(np.array([2]), torch.tensor([[0.8, 0.2]]))  # sample 2's corrected target
    tables = Tables(targets, clean=np.array([0.9, 0.2, 0.1], np.float32))
    assert Select(0.5).train_ids(np.arange(3), tables).tolist() == [0]
    assert Select(0.5).train_ids(np.arange(3), Tables(targets)) is None  # before the first GMM: everything
    method = SelectCorrect(np.array([0, 1, 1]), 2, threshold=0.5)
    _, y = method.inputs_targets(fake_batch([0, 2]), tables, torch.Generator())
    assert y.tolist() == [[1.0, 0.0], pytest.approx([0.8, 0.2], abs=1e-3)]  # clean: given; noisy: corrected


def test_select_correct_mixup_mixes_the_selected_targets_after_warm_up_only():
    from train.methods import SelectCorrect

    labels = np.array([0, 1, 1, 0])
    targets = SoftTargets(labels, 2)
    targets.assign(np.array([2]), torch.tensor([[0.8, 0.2]]))  # sample 2 (judged noisy): corrected target
    method = SelectCorrect(labels, 2, threshold=0.5, mixup_alpha=1.0)
    warm = Tables(targets)  # no GMM yet: the table's rows, nothing mixed
    x, y = method.inputs_targets(fake_batch([0, 1, 2, 3]), warm, torch.Generator().manual_seed(0))
    assert x[:, 0, 0, 0].tolist() == [0, 1, 2, 3] and torch.equal(y, targets.rows(torch.arange(4)))
    tables = Tables(targets, clean=np.array([0.9, 0.9, 0.1, 0.9], np.float32))
    x, y = method.inputs_targets(fake_batch([0, 1, 2, 3]), tables, torch.Generator().manual_seed(0))
    unmixed = torch.tensor([[1.0, 0.0], [0.0, 1.0], targets.rows(torch.tensor([2]))[0].tolist(), [1.0, 0.0]])
    pixel = x[:, 0, 0, 0]  # image i holds the value i: the mixed pixel names the pair and lambda
    assert not torch.equal(pixel, torch.arange(4.0)) and torch.allclose(y.sum(1), unmixed.sum(1)[0].expand(4), atol=1e-3)
    for row in range(4):  # every row is lam * own + (1 - lam) * one partner, images and targets alike
        pairs = [(j, (pixel[row] - j) / (row - j)) for j in range(4) if j != row]
        lam = [l for j, l in pairs if torch.allclose(y[row], l * unmixed[row] + (1 - l) * unmixed[j], atol=1e-5)]
        assert lam and 0 <= float(lam[0]) <= 1
    again = method.inputs_targets(fake_batch([0, 1, 2, 3]), tables, torch.Generator().manual_seed(0))
    assert torch.equal(again[0], x) and torch.equal(again[1], y)  # the step's generator decides the draw


def test_confident_learning_keeps_what_cleanlab_does_not_flag():
    from train.methods import ConfidentLearning

    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 50)
    oos = np.where(labels[:, None] == np.arange(2), 0.9, 0.1).astype(np.float32)
    wrong = rng.choice(100, 10, replace=False)
    oos[wrong] = oos[wrong][:, ::-1]  # these look like the other class
    method = ConfidentLearning(oos, labels)
    kept = method.train_ids(np.arange(100), None)
    assert set(wrong).isdisjoint(kept) and len(kept) == 90
    truth = labels.copy()
    truth[wrong] = 1 - truth[wrong]
    assert method.epoch_metrics(truth)["removed_precision"] == 1.0


def test_in_batch_scope_mixes_with_the_nearest_sample_of_the_batch():
    from train.methods import MixNNInBatch

    class Identity(torch.nn.Module):  # embeddings = the pixel values themselves
        def forward_features(self, x):
            return x

        def forward_head(self, x, pre_logits=False):
            return x.flatten(1)

    targets = SoftTargets(np.array([0, 1, 2, 3]), 4)
    tables = Tables(targets, clean=np.array([0.5, 0.5, 0.9, 0.1], np.float32))
    batch = fake_batch([0, 1, 2, 3])
    batch["images"] = torch.tensor([0.0, 0.1, 5.0, 5.2]).view(4, 1, 1, 1)
    x, y = MixNNInBatch(k=1).inputs_targets(batch, tables, torch.Generator(), model=Identity())
    assert torch.allclose(x.flatten(), torch.tensor([0.05, 0.05, 0.9 * 5.0 + 0.1 * 5.2, 0.1 * 5.2 + 0.9 * 5.0]))
    assert torch.allclose(y[2], torch.tensor([0, 0, 0.9, 0.1]))


def test_gmm_loss_window_averages_the_last_refreshes():
    from train.tables import windowed_losses

    history, mean = windowed_losses(None, np.array([1.0, np.nan, 3.0]), 2)
    assert np.allclose(mean[[0, 2]], [1.0, 3.0]) and np.isnan(mean[1])
    history, mean = windowed_losses(history, np.array([3.0, 2.0, np.nan]), 2)
    assert np.allclose(mean, [2.0, 2.0, 3.0])
    history, mean = windowed_losses(history, np.array([5.0, 4.0, 1.0]), 2)  # the oldest drops out
    assert np.allclose(mean, [4.0, 3.0, 1.0])
    assert windowed_losses(None, np.array([7.0]), 1) == (None, np.array([7.0]))


class FixedNet(torch.nn.Module):
    """logits = [image value, 0]: sample id v (an image filled with v) is predicted class 0 with p = sigmoid(v)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        v = x.flatten(1)[:, 0]
        return torch.stack([v, torch.zeros_like(v)], 1)


def test_guessed_targets_replace_only_the_noisy_rows_by_the_sharpened_prediction():
    from train.methods import guessed_targets, sharpen_rows

    net, images = FixedNet(), torch.tensor([0.0, 1.0, 2.0]).view(3, 1, 1, 1)
    targets = torch.tensor([[0.0, 1.0]] * 3)
    out = guessed_targets(net, images, targets, torch.tensor([False, True, True]), 0.5)
    p = torch.softmax(torch.tensor([[1.0, 0.0], [2.0, 0.0]]), 1)
    assert torch.equal(out[0], targets[0]) and torch.allclose(out[1:], sharpen_rows(p, 0.5))
    assert torch.allclose(sharpen_rows(p, 0.5)[0], torch.tensor([1.0, math.exp(-2)]) / (1 + math.exp(-2)))
    assert guessed_targets(net, images, targets, torch.zeros(3, dtype=torch.bool), 0.5) is targets and net.calls == 1


def test_guess_online_in_mixnn_select_correct_and_selectmix():
    from train.methods import SelectCorrect, SelectMix

    targets = SoftTargets(np.array([1, 1, 1, 1]), 2)
    tables = Tables(targets, clean=np.array([0.9, 0.1, 0.9, 0.9], np.float32), partners=np.array([[2], [3], [0], [0]]))
    p1 = torch.softmax(torch.tensor([1.0, 0.0]), 0)  # the net's prediction for sample 1 (image value 1)
    guess = p1 ** 2 / (p1 ** 2).sum()
    # MixNN, avg weights: anchor 1 (noisy) is guessed, its clean neighbour 3 keeps its label
    _, y = MixNN(k=1, weights="avg", guess=0.5).inputs_targets(fake_batch([1, 3]), tables, torch.Generator(), FixedNet())
    assert torch.allclose(y[0], 0.5 * guess + 0.5 * torch.tensor([0.0, 1.0]))
    _, y = MixNN(k=1, weights="avg").inputs_targets(fake_batch([1, 3]), tables, torch.Generator(), FixedNet())
    assert torch.allclose(y[0], torch.tensor([0.0, 1.0]))  # without guessing: the soft targets
    _, y = SelectCorrect(np.array([1, 1, 1, 1]), 2, guess=0.5).inputs_targets(fake_batch([0, 1]), tables,
                                                                            torch.Generator(), FixedNet())
    assert torch.allclose(y, torch.stack([torch.tensor([0.0, 1.0]), guess]))
    oos = np.array([[0.9, 0.1], [0.9, 0.1], [0.05, 0.95], [0.05, 0.95]], np.float32)  # 0, 1 uncertain
    method = SelectMix(oos, np.array([1, 1, 1, 1]), alpha=0.0)
    method.guess = 0.5
    _, y = method.inputs_targets(fake_batch([1, 2, 2, 2]), tables, torch.Generator(), FixedNet())
    # anchor 1 uncertain, mixed 0.5/0.5 with confident sample 2: its own half is the guess, not the fold's oos
    assert torch.allclose(y[0], 0.5 * guess + 0.5 * torch.tensor([0.0, 1.0]))
    assert torch.allclose(y[1], torch.tensor([0.0, 1.0]))  # a confident anchor trains on its label


def test_prior_penalty_is_zero_for_balanced_predictions_and_added_by_method_loss():
    from train.methods import method_loss
    from train.methods import CrossEntropy, prior_penalty

    assert float(prior_penalty(torch.tensor([[2.0, 0.0], [0.0, 2.0]]))) == pytest.approx(0.0, abs=1e-6)
    assert float(prior_penalty(torch.tensor([[2.0, 0.0], [2.0, 0.0]]))) > 0.2
    tables, batch = Tables(SoftTargets(np.array([0, 0]), 2)), fake_batch([0, 1])
    plain, _ = method_loss(CrossEntropy(), tables, 0, FixedNet())(batch, 0)
    with_prior, _ = method_loss(CrossEntropy(), tables, 0, FixedNet(), prior=True)(batch, 0)
    assert float(with_prior - plain) == pytest.approx(float(prior_penalty(FixedNet()(batch["images"]))))


def test_guessing_one_noisy_sample_through_batchnorm():
    """A batch with a single noisy sample (select-correct at symmetric 80% crashed on it): the guess forward
    runs over the whole batch, so BatchNorm in train mode never sees a batch of one."""
    from train.methods import guessed_targets

    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3)).train()
    images, targets = torch.randn(4, 1, 2, 2), torch.full((4, 3), 1 / 3)
    noisy = torch.tensor([False, False, True, False])
    out = guessed_targets(net, images, targets, noisy, 0.5)
    assert torch.equal(out[~noisy], targets[~noisy]) and torch.allclose(out[2].sum(), torch.tensor(1.0))
    assert not torch.allclose(out[2], targets[2])


def test_a_warm_up_in_id_order_over_class_sorted_ids_is_warned_about():
    """`warmup_data: plain` reads ids in order: over a folder- or list-sorted split every batch is one class."""
    from train.config import load_config
    from train.methods.base import single_class_share, warmup_order_warning

    cfg = load_config([])  # MixNN: warmup_data plain
    by_class = np.repeat(np.arange(10), 130)
    assert single_class_share(by_class, 64) == 1.0
    assert "--warmup_data augmented" in warmup_order_warning(cfg, by_class)
    assert warmup_order_warning(cfg, np.random.default_rng(0).permutation(by_class)) == ""
    assert warmup_order_warning(load_config(["--warmup_data", "augmented"]), by_class) == ""
    assert warmup_order_warning(load_config(["--warmup_epochs", "0"]), by_class) == ""
    assert warmup_order_warning(cfg, np.zeros(1300, np.int64)) == ""  # one class is not an order problem
    assert warmup_order_warning(cfg, np.full(100, -1)) == ""  # no given labels
    assert single_class_share(np.repeat(np.arange(10), 100_000), 64) > 0.99  # 15,625 batches, 2,000 looked at
