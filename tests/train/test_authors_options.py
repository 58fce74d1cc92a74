"""The options that reproduce the MixNN authors' released script: pre-E_s loss, train-mode in-batch
neighbours, un-augmented warm-up in id order, and launch/configs/mixnn_authors.yaml."""
import math

import numpy as np
import pytest
import torch

from data.plan import build_epoch_plan
from train.config import CONFIG_DIR, Config, ConfigError, load_config
from train.methods.base import EpochContext, warmup_plan
from train.methods import CrossEntropy, MixNN, MixNNInBatch, Mixup, Tables, probability_loss, soft_cross_entropy
from train.targets import SoftTargets


def test_probability_loss_is_minus_the_probability_of_the_target():
    logits = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]])  # softmax (0.75, 0.25) and (0.5, 0.5)
    loss = probability_loss(logits, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert loss.item() == pytest.approx(-(0.75 + 0.5) / 2)
    # bounded: a confidently wrong label costs at most 1, where cross-entropy grows without limit
    wrong = torch.tensor([[20.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    assert probability_loss(*wrong).item() > -1e-6 and soft_cross_entropy(*wrong).item() > 19


def test_the_early_loss_applies_between_warm_up_and_correction_only():
    cfg = Config(warmup_epochs=2, correction_epoch=5, early_loss="prob")
    method = MixNN()
    assert isinstance(method.for_epoch(cfg, 1), CrossEntropy) and method.for_epoch(cfg, 1).criterion == "ce"
    early = method.for_epoch(cfg, 3)
    assert isinstance(early, MixNN) and early.criterion == "prob" and method.criterion == "ce"  # a copy
    assert method.for_epoch(cfg, 5) is method
    logits, targets = torch.randn(4, 3), torch.softmax(torch.randn(4, 3), 1)
    assert early.loss(logits, targets) == probability_loss(logits, targets)
    assert method.loss(logits, targets) == soft_cross_entropy(logits, targets)
    mixup = method.for_epoch(Config(warmup_epochs=2, correction_epoch=5, early_loss="prob", mix_start="correction"), 3)
    assert isinstance(mixup, Mixup) and mixup.criterion == "prob"  # the authors' pre-E_s phase: mixup, -p loss
    assert method.for_epoch(Config(warmup_epochs=2, correction_epoch=-1, early_loss="prob"), 3) is method


class TinyNet(torch.nn.Module):
    """Linear -> BatchNorm features, a linear classifier: timm's forward_features/forward_head interface."""

    def __init__(self):
        super().__init__()
        self.body, self.bn, self.fc = torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2)

    def forward_features(self, x):
        return self.bn(self.body(x.flatten(1)))

    def forward_head(self, x, pre_logits=False):
        return x if pre_logits else self.fc(x)

    def get_classifier(self):
        return self.fc

    def forward(self, x):
        return self.fc(self.forward_features(x))


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_in_batch_neighbours_in_train_mode_update_batchnorm_like_the_authors_first_forward(mode):
    torch.manual_seed(0)
    model = TinyNet().train()
    tables = Tables(SoftTargets(np.zeros(8, dtype=np.int64), 2), clean=np.full(8, 0.5, np.float32))
    batch = {"images": torch.randn(8, 1, 2, 2) + 3.0, "ids": torch.arange(8), "valid": torch.ones(8, dtype=torch.bool)}
    before = model.bn.running_mean.clone()
    x, y = MixNNInBatch(mode=mode).inputs_targets(batch, tables, torch.Generator().manual_seed(0), model=model)
    assert x.shape == (8, 1, 2, 2) and torch.allclose(y.sum(1), torch.ones(8))
    assert model.training  # the mode is restored for the training forward
    moved = not torch.equal(model.bn.running_mean, before)
    assert moved == (mode == "train")


def test_plain_mixup_steps_with_in_batch_neighbours_keep_the_un_mixed_train_mode_forward():
    """Before the kNN phase the authors' steps still run the un-mixed forward (BatchNorm statistics move) and
    mix with a random row under one lam: the same images and targets as mixup with the same draws."""
    torch.manual_seed(0)
    model = TinyNet().train()
    tables = Tables(SoftTargets(np.arange(8, dtype=np.int64) % 2, 2), clean=np.full(8, 0.5, np.float32))
    batch = {"images": torch.randn(8, 1, 2, 2) + 3.0, "ids": torch.arange(8), "valid": torch.ones(8, dtype=torch.bool)}
    cfg = Config(method="mixnn", knn_scope="batch", batch_knn_mode="train", mix_start="correction",
                 warmup_epochs=2, correction_epoch=5, early_loss="prob", mixup_alpha=1.0)
    method = MixNNInBatch(mode="train").for_epoch(cfg, 3)
    assert isinstance(method, MixNNInBatch) and method.plain_alpha == 1.0 and method.criterion == "prob"
    before = model.bn.running_mean.clone()
    x, y = method.inputs_targets(batch, tables, torch.Generator().manual_seed(3), model=model)
    assert not torch.equal(model.bn.running_mean, before) and model.training
    mx, my = Mixup(1.0).inputs_targets(batch, tables, torch.Generator().manual_seed(3))
    assert torch.allclose(x, mx, atol=1e-6) and torch.allclose(y, my, atol=1e-6)
    assert not torch.allclose(x, batch["images"])  # mixed, not passed through
    assert MixNNInBatch(mode="train").for_epoch(cfg, 5).plain_alpha is None  # E_s: neighbours


def test_after_correction_keeps_plain_mixup_through_e_s_under_the_soft_label_loss():
    cfg = Config(method="mixnn", knn_scope="batch", batch_knn_mode="train", mix_start="after_correction",
                 warmup_epochs=2, correction_epoch=9, early_loss="prob", target_update="step", target_update_every=10,
                 mixup_alpha=1.0)
    at_es = MixNNInBatch(mode="train").for_epoch(cfg, 9)  # E_s = 9 is the 10th epoch: a due one
    assert at_es.plain_alpha == 1.0 and at_es.criterion == "ce" and at_es.step_momentum == 0.9
    assert MixNNInBatch(mode="train").for_epoch(cfg, 8).criterion == "prob"
    after = MixNNInBatch(mode="train")
    assert after.for_epoch(cfg, 10) is after
    # the same for neighbours from the global index: plain mixup (soft targets) at E_s, MixNN after
    glob = Config(method="mixnn", mix_start="after_correction", warmup_epochs=2, correction_epoch=5)
    assert isinstance(MixNN().for_epoch(glob, 5), Mixup) and isinstance(MixNN().for_epoch(glob, 6), MixNN)
    assert isinstance(MixNN().for_epoch(Config(method="mixnn", mix_start="correction", warmup_epochs=2, correction_epoch=5), 5), MixNN)
    # the step update of a plain epoch moves the targets of the batch from the un-mixed forward
    torch.manual_seed(0)
    model = TinyNet().train()
    tables = Tables(SoftTargets(np.zeros(8, dtype=np.int64), 2), clean=np.full(8, 0.5, np.float32))
    batch = {"images": torch.randn(8, 1, 2, 2), "ids": torch.arange(8), "valid": torch.ones(8, dtype=torch.bool)}
    at_es.inputs_targets(batch, tables, torch.Generator().manual_seed(0), model=model)
    assert len(at_es.step_updates) == 1 and at_es.step_updates[0][0].tolist() == list(range(8))


def test_plain_warm_up_reads_every_sample_in_id_order_through_the_eval_transform():
    class Data:
        train, train_plain = list(range(10)), "plain view"

    plan = build_epoch_plan(np.zeros(10, dtype=np.int64), seed=0, epoch=0, batch_size=4, world_size=2)
    cfg = Config(warmup_epochs=2, warmup_data="plain")
    warm, dataset = warmup_plan(EpochContext(cfg, 1, None, Data, None, None), plan)
    assert dataset == "plain view" and warm.ids.tolist() == [*range(10), 0, 1]  # padded to whole batches
    assert [b.tolist() for b in warm.batches(1)] == [[2, 3], [6, 7], [0, 1]]
    assert warmup_plan(EpochContext(cfg, 1, None, Data, None, None), plan)[0].ids.tolist() == warm.ids.tolist()  # the same every epoch
    assert warmup_plan(EpochContext(cfg, 2, None, Data, None, None), plan) == (plan, Data.train)  # after warm-up: the epoch's own plan
    assert warmup_plan(EpochContext(Config(warmup_epochs=2), 0, None, Data, None, None), plan) == (plan, Data.train)


def test_authors_options_are_checked():
    with pytest.raises(ConfigError, match="--early_loss is a mixnn setting; it does nothing with --method ce"):
        load_config(["--method", "ce", "--early_loss", "prob"])
    assert load_config(["--method", "ce", "--early_loss", "ce"]).early_loss == "ce"  # what ce runs anyway: harmless
    with pytest.raises(ConfigError, match="--batch_knn_mode works with --method mixnn --knn_scope batch"):
        load_config(["--knn_scope", "global", "--batch_knn_mode", "train"])
    with pytest.raises(ConfigError, match="--warmup_data must be one of auto, augmented, plain"):
        load_config(["--warmup_data", "clean"])


def test_mixnn_authors_config_follows_their_script():
    cfg = load_config(["--config", f"{CONFIG_DIR}/digits.yaml,{CONFIG_DIR}/mixnn_authors.yaml"])
    expected = dict(method="mixnn", k=1, weights="clean", knn_scope="batch", batch_knn_mode="train", mix_start="after_correction",
                    mixup_alpha=1.0, early_loss="prob", warmup_data="plain", ema=0.9, target_update_every=10,
                    target_update="step",
                    gmm_loss="corrected", gmm_split="global", gmm_scale="linear", gmm_loss_window=1, lr_min=0.001,
                    weight_decay=0.001, restart_period=10, correction_epoch=9, warmup_epochs=5, epochs=60)
    assert {k: getattr(cfg, k) for k in expected} == expected
    from train.tables import correction_due  # their soft labels move in 1-based epochs 10, 20, ..., 60

    assert [e + 1 for e in range(60) if correction_due(cfg, e)] == [10, 20, 30, 40, 50, 60]


def test_step_target_updates_move_the_batch_in_its_own_loss_and_reach_the_tables_at_the_epochs_end():
    from train.tables import apply_step_updates

    torch.manual_seed(0)
    model = TinyNet().train()
    tables = Tables(SoftTargets(np.zeros(8, dtype=np.int64), 2), clean=np.full(8, 0.5, np.float32))
    batch = {"images": torch.randn(8, 1, 2, 2), "ids": torch.arange(8), "valid": torch.ones(8, dtype=torch.bool)}
    method = MixNNInBatch(mode="train").for_epoch(Config(method="mixnn", knn_scope="batch", target_update="step", correction_epoch=3,
                                 target_update_every=10, warmup_epochs=0), 9)
    assert method.step_momentum == 0.9
    _, y = method.inputs_targets(batch, tables, torch.Generator().manual_seed(0), model=model)
    assert (y[:, 1] > 0).all()  # every target moved 10% toward the prediction before the loss used it
    assert torch.equal(tables.targets.rows([0]), torch.tensor([[1.0, 0.0]]))  # the tables wait for the epoch's end
    ids, p = method.step_updates[0]
    assert apply_step_updates(tables, method.step_updates + [(ids[:2], 1 - p[:2])], 0.9) == 8  # a repeat: once
    assert torch.allclose(tables.targets.rows(list(range(8))), 0.9 * torch.tensor([1.0, 0.0]) + 0.1 * torch.from_numpy(p),
                          atol=1e-3)
    assert MixNNInBatch().for_epoch(Config(knn_scope="batch", target_update="step", correction_epoch=3, target_update_every=10,
                               warmup_epochs=0), 4).step_momentum is None  # not a due epoch (5th)
    with pytest.raises(ConfigError, match="--target_update step works with --method mixnn --knn_scope batch"):
        load_config(["--knn_scope", "global", "--target_update", "step"])


def test_the_window_can_average_each_refreshs_normalised_losses_as_the_authors():
    from train.tables import fit_losses

    first, second = np.array([0.0, 1.0, 10.0, 2.0], np.float32), np.array([0.0, 4.0, 8.0, 8.0], np.float32)
    cfg = Config(gmm_loss_window=2, gmm_window_scale="normalised", gmm_split="global", gmm_scale="linear")
    history, _, _, _ = fit_losses(cfg, first, None, 0, True, np.zeros(4, np.int64))
    _, averaged, clean, _ = fit_losses(cfg, second, history, 0, True, np.zeros(4, np.int64))
    assert np.allclose(averaged, [0.0, 0.3, 1.0, 0.6])  # mean of (0, .1, 1, .2) and (0, .5, 1, 1)
    raw = Config(gmm_loss_window=2, gmm_split="global", gmm_scale="linear")
    history, _, _, _ = fit_losses(raw, first, None, 0, True, np.zeros(4, np.int64))
    assert np.allclose(fit_losses(raw, second, history, 0, True, np.zeros(4, np.int64))[1], [0.0, 2.5, 9.0, 5.0])
    assert clean[0] > clean[2]
    logged = Config(gmm_loss_window=2, gmm_window_scale="normalised", gmm_split="global", gmm_scale="log")
    history, _, _, _ = fit_losses(logged, first, None, 0, True, np.zeros(4, np.int64))
    assert np.allclose(fit_losses(logged, second, history, 0, True, np.zeros(4, np.int64))[1], [0.0, 0.3, 1.0, 0.6])
