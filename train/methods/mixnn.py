"""MixNN (Lu & He): mix each sample with its nearest neighbours, weighted by GMM clean probabilities."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from index.knn import knn_in_batch

from ..tables import apply_step_updates, correction_due
from .base import CrossEntropy, Tables, beta_draw, clean_weights, group_rows, guess_temperature, guessed_targets, \
    mix_groups, unwrap
from .mixup import Mixup, mixup_draws


@dataclass
class MixNNOptions:
    """MixNN's options."""

    section: ClassVar[str] = "mixnn"
    choices: ClassVar[dict] = {"weights": ("clean", "avg", "random", "beta"), "partners": ("knn", "random"),
                               "mix_start": ("auto", "warmup", "correction", "after_correction"),
                               "early_loss": ("auto", "ce", "prob"), "batch_knn_mode": ("auto", "eval", "train"),
                               "target_update": ("auto", "refresh", "step")}
    weights: str = "clean"  # clean (Eq. 10/11) | avg | random | beta (anchor lam ~ Beta, max(lam, 1 - lam))
    partners: str = "knn"  # knn | random
    mix_start: str = "auto"  # MixNN mixes with neighbours from: warmup (end of warm-up) | correction (E_s; plain
    #                          mixup with random in-batch partners before it) | after_correction (E_s + 1: the epoch
    #                          E_s itself is plain mixup under the soft-label loss, the authors' `epoch > es`; MixNN's)
    early_loss: str = "auto"  # MixNN's loss between warm-up and E_s: ce (soft cross-entropy) | prob (-sum_c y_c p_c,
    #                           a bounded loss: the MixNN authors' F.nll_loss on softmax probabilities; MixNN's)
    batch_knn_mode: str = "auto"  # knn_scope batch: the un-mixed forward that finds the neighbours runs in eval mode
    #                               | train (batch statistics, BatchNorm's running statistics updated: the authors'
    #                               code, MixNN's default)
    target_update: str = "auto"  # where Eq. 12 takes p from: refresh (eval mode, un-augmented, at the epoch's
    #                              refresh) | step (the un-mixed train-mode forward of each training step, used by
    #                              that step's loss: the authors' loss.py, MixNN's default; needs knn_scope batch)


def beta_weights(n: int, groups: int, alpha: float, generator: torch.Generator) -> torch.Tensor:
    """[n, groups] weights: the anchor keeps max(lam, 1 - lam), lam ~ Beta(alpha, alpha); the partners share
    the rest equally. Drawn from `generator` (seeded per step) so a resumed run draws the same."""
    lam = torch.from_numpy(beta_draw(alpha, generator, size=n)).float()
    lam = torch.maximum(lam, 1 - lam)
    rest = ((1 - lam) / max(groups - 1, 1))[:, None].expand(n, groups - 1)
    return torch.cat([lam[:, None], rest], 1)


class MixNN(CrossEntropy):
    """Mix each sample with its K nearest neighbours, weighted by clean probabilities (Eq. 4, 5, 10, 11).

    Options: `weights` avg (equal), random (Dirichlet(1)) or beta (the anchor keeps lam ~ Beta(alpha, alpha),
    max(lam, 1 - lam), the neighbours share the rest); `partners` random instead of knn.
    """

    name, uses_tables, guesses = "mixnn", True, True
    options = (MixNNOptions,)
    # the authors' train_cifar_with_MixNN.py (as launch/configs/mixnn_authors.yaml, whose comments cite the
    # lines), but the GMM on losses averaged over the last 5 refreshes at every noise rate (AUTO_DEFAULTS; the
    # authors average only when told r = 0.8), chosen on the noisy val split (docs/benchmarks.md);
    # launch/configs/mixnn_global.yaml is the paper's global neighbour search instead
    defaults = {"knn_scope": "batch", "batch_knn_mode": "train", "target_update": "step",
                "target_update_every": 10, "mix_start": "after_correction", "early_loss": "prob",
                "warmup_data": "plain", "gmm_loss": "corrected", "gmm_window_scale": "normalised"}

    @classmethod
    def check_config(cls, cfg) -> None:
        from ..config import ConfigError  # the config module reads this class's options

        if cfg.target_update == "step" and (cfg.knn_scope != "batch" or cfg.guess != "none" or cfg.sharpen != 1.0
                                            or cfg.target_source != "prediction"):
            raise ConfigError("--target_update step works with --method mixnn --knn_scope batch (the step's "
                              "un-mixed forward gives p), target_source prediction, sharpen 1 and guess none")
        if cfg.batch_knn_mode != "eval" and cfg.knn_scope != "batch":
            raise ConfigError("--batch_knn_mode works with --method mixnn --knn_scope batch")

    @classmethod
    def from_config(cls, cfg, labels, num_classes, oos=None):
        """In-batch neighbours (`knn_scope: batch`, MixNNInBatch) or the global search's neighbour table."""
        guess = guess_temperature(cfg)
        if getattr(cfg, "knn_scope", "global") == "batch":
            return MixNNInBatch(cfg.k, cfg.weights, cfg.mixup_alpha, guess=guess, threshold=cfg.clean_threshold,
                                mode=getattr(cfg, "batch_knn_mode", "eval"))
        return cls(cfg.k, cfg.weights, cfg.partners, cfg.mixup_alpha, guess=guess, threshold=cfg.clean_threshold)

    def for_epoch(self, cfg, epoch: int) -> CrossEntropy:
        """CE during warm-up; with `mix_start: correction`, plain mixup (random in-batch partner) until E_s
        (`after_correction`: through E_s, neighbours from E_s + 1, the MixNN authors' `epoch > es`; with
        in-batch neighbours those steps keep the un-mixed forward); with `early_loss`, the loss before E_s is
        that criterion (the authors': -p[label]); with `target_update: step`, a due epoch moves the soft
        targets in its steps."""
        if epoch < cfg.warmup_epochs:
            return CrossEntropy()
        method = self
        plain_until = cfg.correction_epoch + (cfg.mix_start == "after_correction")  # E_s, or through E_s itself
        if cfg.mix_start in ("correction", "after_correction") and epoch < plain_until:
            method = method.plain_mixing(cfg.mixup_alpha) if isinstance(method, MixNNInBatch) else Mixup(cfg.mixup_alpha)
        if epoch < max(cfg.correction_epoch, 0) and cfg.early_loss != method.criterion:
            method = copy.copy(method)
            method.criterion = cfg.early_loss
        if cfg.target_update == "step" and isinstance(method, MixNN) and correction_due(cfg, epoch):
            method = copy.copy(method)
            method.step_momentum, method.step_updates = cfg.ema, []
        return method

    def __init__(self, k: int = 1, weights: str = "clean", partners: str = "knn", alpha: float = 1.0,
                 guess: float | None = None, threshold: float = 0.5):
        if weights not in ("clean", "avg", "random", "beta") or partners not in ("knn", "random"):
            raise ValueError(f"MixNN: weights must be clean|avg|random|beta and partners knn|random, "
                             f"got {weights}, {partners}")
        self.num_partners, self.weights, self.partners, self.alpha = k, weights, partners, alpha
        self.guess, self.threshold = guess, threshold  # guess: temperature of the online targets (None: off)

    def group_targets(self, images: torch.Tensor, ids: torch.Tensor, tables: Tables, model) -> torch.Tensor:
        """[b, 1+K, C] targets of the group members: their soft targets; with `guess`, the members the GMM
        judges noisy take the network's current sharpened prediction instead (`guessed_targets`)."""
        targets = tables.targets.rows(ids.flatten()).view(*ids.shape, -1)
        if self.guess is None or tables.clean is None:
            return targets
        noisy = torch.from_numpy(tables.clean[ids.numpy()] <= self.threshold)
        return guessed_targets(model, images, targets, noisy, self.guess)

    def partner_ids(self, anchors, tables, epoch_ids, rng):
        if self.partners == "random" or tables.partners is None:
            return rng.choice(epoch_ids, size=(len(anchors), self.num_partners))
        found = tables.partners[anchors][:, : self.num_partners]
        return np.where(found >= 0, found, anchors[:, None])  # no neighbour: mix with itself

    def group_weights(self, ids: torch.Tensor, tables: Tables, generator) -> torch.Tensor:
        if self.weights == "avg" or tables.clean is None:
            return torch.full(ids.shape, 1.0 / ids.shape[1])
        if self.weights == "random":
            draw = -torch.log(torch.rand(ids.shape, generator=generator).clamp_min(1e-12))  # Exp(1)
            return draw / draw.sum(1, keepdim=True)
        if self.weights == "beta":
            return beta_weights(len(ids), ids.shape[1], self.alpha, generator)
        return clean_weights(torch.from_numpy(tables.clean[ids.numpy()]).float())

    def inputs_targets(self, batch, tables, generator, model=None):
        images, ids, valid = group_rows(batch, self.num_partners)
        images, ids = images[valid], ids[valid].cpu()
        targets = self.group_targets(images, ids, tables, model)
        weights = self.group_weights(ids, tables, generator).to(images.device)
        return mix_groups(images, targets.to(images.device), weights)


class MixNNInBatch(MixNN):
    """MixNN with neighbours searched inside each mini-batch (the MixNN authors' released code): an extra
    no-grad forward of the un-mixed batch gives the features, so a step costs two forward passes."""

    name = "mixnn"

    def __init__(self, k: int = 1, weights: str = "clean", alpha: float = 1.0, guess: float | None = None,
                 threshold: float = 0.5, mode: str = "eval"):
        super().__init__(k, weights, "knn", alpha, guess, threshold)
        self.k, self.num_partners = k, 0  # partners come from the batch itself, none are read by id
        self.mode = mode  # the un-mixed forward in eval mode, or in train mode (BatchNorm on the batch, its
        #                   running statistics updated, as the authors' first forward of each step)
        self.step_momentum = None  # set for an epoch whose soft targets move in the training steps (see below)
        self.step_updates: list[tuple[np.ndarray, np.ndarray]] = []  # (ids, softmax) of this epoch's steps
        self.plain_alpha = None  # set for an epoch of plain mixup (`plain_mixing`): random in-batch partners

    def updated_targets(self, ids: torch.Tensor, logits: torch.Tensor, tables: Tables) -> torch.Tensor:
        """`target_update: step`: Eq. 12 from the prediction of this step's un-mixed forward, t' = a t + (1 - a) p,
        used by this step's loss (the authors' loss.py:60-63); the (ids, p) are kept so the epoch's end writes
        them into every rank's tables (`train.tables.apply_step_updates`)."""
        p = torch.softmax(logits.float(), 1).cpu()
        self.step_updates.append((ids.numpy().copy(), p.numpy()))
        return self.step_momentum * tables.targets.rows(ids) + (1 - self.step_momentum) * p

    def finish(self, tables: Tables):
        """`target_update: step`: the epoch's step updates written into every rank's tables after the pass."""
        if self.step_momentum is None:
            return None
        return lambda: {"targets_moved_in_steps": apply_step_updates(tables, self.step_updates, self.step_momentum)}

    def plain_mixing(self, alpha: float) -> "MixNNInBatch":
        """A copy that mixes each row with a random other row of the batch, one lam ~ Beta(alpha, alpha) for the
        batch (mixup's draws, in mixup's order), after the same un-mixed forward as a neighbour step: the MixNN
        authors' steps before their kNN phase (T:88-98, T:114), whose train-mode forward also moves
        BatchNorm's running statistics, and whose output moves the soft targets with `target_update: step`."""
        method = copy.copy(self)
        method.plain_alpha = alpha
        return method

    def inputs_targets(self, batch, tables, generator, model=None):
        images, ids, valid = group_rows(batch, 0)
        images, ids = images[valid, 0], ids[valid, 0].cpu()
        if len(images) < 2:
            return images, tables.targets.rows(ids).to(images.device)
        was_training = model.training
        model.train(self.mode == "train")
        with torch.no_grad():
            features = unwrap(model).forward_head(unwrap(model).forward_features(images), pre_logits=True)
            logits = unwrap(model).get_classifier()(features) if self.step_momentum is not None else None
        model.train(was_training)
        if self.plain_alpha is not None:
            lam, perm = mixup_draws(len(ids), self.plain_alpha, generator)
            near = perm[:, None]
        else:
            near = knn_in_batch(features, self.k).cpu()  # [b, k] positions
        groups = torch.cat([torch.arange(len(ids))[:, None], near], 1)  # [b, 1+k]
        group_ids, group_images = ids[groups], images[groups.to(images.device)]
        if logits is not None:  # partners are rows of the same batch: their moved targets too
            targets = self.updated_targets(ids, logits, tables)[groups]
        else:
            targets = self.group_targets(group_images, group_ids, tables, model)
        if self.plain_alpha is not None:
            weights = torch.tensor([lam, 1 - lam]).expand(len(ids), 2).to(images.device)
        else:
            weights = self.group_weights(group_ids, tables, generator).to(images.device)
        return mix_groups(group_images, targets.to(images.device), weights)
