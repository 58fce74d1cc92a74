"""Training methods: given a batch and the per-sample tables, return mixed inputs and soft targets.

A batch holds `b` anchors followed by their `b x P` partners (P = `num_partners`), all read by sample
id in one loader step, so the partners' images are prefetched with the anchors.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from index.knn import knn_in_batch

from .targets import SoftTargets


@dataclass
class Tables:
    """Per-sample tables of the epoch, indexed by sample id and identical on every rank."""

    targets: SoftTargets
    clean: np.ndarray | None = None  # [N] float32, P(clean | loss) from the last GMM
    partners: np.ndarray | None = None  # [N, K] int64 neighbour ids, -1 where none
    loss_history: np.ndarray | None = None  # [W, N] float32 per-sample losses of the last W refreshes


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Eq. 7: mean over the batch of -sum_c y_c log softmax(logits)_c."""
    return -(targets * F.log_softmax(logits.float(), dim=1)).sum(1).mean()


def mix_groups(images: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor):
    """Eq. 4/5: x~ = sum_j w_j x_j, y~ = sum_j w_j t_j over groups [b, 1+K, ...] with weights [b, 1+K]."""
    shape = (*weights.shape, *([1] * (images.dim() - 2)))
    return (weights.view(shape) * images).sum(1), (weights.unsqueeze(-1) * targets).sum(1)


def clean_weights(clean: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Eq. 10/11: lam, beta_k = p / sum(p) over (sample, neighbours); equal weights when all p ~ 0."""
    total = clean.sum(1, keepdim=True)
    equal = torch.full_like(clean, 1.0 / clean.shape[1])
    return torch.where(total > eps, (clean + eps / clean.shape[1]) / (total + eps), equal)


def group_rows(batch: dict, partners: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split a flat loader batch into (images [b, 1+P, ...], ids [b, 1+P], usable [b]) groups."""
    n = len(batch["valid"]) // (1 + partners)
    order = lambda t: t.view(1 + partners, n, *t.shape[1:]).transpose(0, 1)  # anchors first, then P blocks
    valid = order(batch["valid"]).all(1)
    return order(batch["images"]), order(batch["ids"]), valid


class CrossEntropy:
    """Plain cross-entropy against the current targets (one-hot given labels unless corrected)."""

    name, num_partners = "ce", 0

    def partner_ids(self, anchors: np.ndarray, tables: Tables, epoch_ids: np.ndarray, rng) -> np.ndarray:
        return np.zeros((len(anchors), 0), dtype=np.int64)

    def inputs_targets(self, batch: dict, tables: Tables, generator: torch.Generator, model=None):
        images, ids, valid = group_rows(batch, 0)
        ids = ids[valid, 0]
        return images[valid, 0], tables.targets.rows(ids.cpu()).to(images.device)


class Mixup(CrossEntropy):
    """mixup: a random partner inside the batch, lambda ~ Beta(alpha, alpha)."""

    name = "mixup"

    def __init__(self, alpha: float = 1.0):
        self.alpha = alpha

    def inputs_targets(self, batch, tables, generator, model=None):
        x, y = super().inputs_targets(batch, tables, generator)
        if len(x) < 2:
            return x, y
        lam = float(np.random.default_rng(int(torch.randint(2**31, (1,), generator=generator))).beta(self.alpha, self.alpha))
        perm = torch.randperm(len(x), generator=generator)
        return lam * x + (1 - lam) * x[perm], lam * y + (1 - lam) * y[perm]


class MixNN(CrossEntropy):
    """Mix each sample with its K nearest neighbours, weighted by clean probabilities (Eq. 4, 5, 10, 11).

    Ablations: `weights` avg (equal) or random (Dirichlet(1)); `partners` random instead of knn.
    """

    name = "mixnn"

    def __init__(self, k: int = 1, weights: str = "clean", partners: str = "knn"):
        if weights not in ("clean", "avg", "random") or partners not in ("knn", "random"):
            raise ValueError(f"MixNN: weights must be clean|avg|random and partners knn|random, got {weights}, {partners}")
        self.num_partners, self.weights, self.partners = k, weights, partners

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
        return clean_weights(torch.from_numpy(tables.clean[ids.numpy()]).float())

    def inputs_targets(self, batch, tables, generator, model=None):
        images, ids, valid = group_rows(batch, self.num_partners)
        images, ids = images[valid], ids[valid].cpu()
        targets = tables.targets.rows(ids.flatten()).view(*ids.shape, -1)
        weights = self.group_weights(ids, tables, generator).to(images.device)
        return mix_groups(images, targets.to(images.device), weights)


class MixNNInBatch(MixNN):
    """MixNN with neighbours searched inside each mini-batch (the MixNN authors' released code): an extra
    no-grad forward of the un-mixed batch gives the features, so a step costs two forward passes."""

    name = "mixnn"

    def __init__(self, k: int = 1, weights: str = "clean"):
        super().__init__(k, weights, "knn")
        self.k, self.num_partners = k, 0  # partners come from the batch itself, none are read by id

    def inputs_targets(self, batch, tables, generator, model=None):
        images, ids, valid = group_rows(batch, 0)
        images, ids = images[valid, 0], ids[valid, 0].cpu()
        if len(images) < 2:
            return images, tables.targets.rows(ids).to(images.device)
        was_training = model.training
        model.eval()
        with torch.no_grad():
            features = unwrap(model).forward_head(unwrap(model).forward_features(images), pre_logits=True)
        model.train(was_training)
        near = knn_in_batch(features, self.k).cpu()  # [b, k] positions
        groups = torch.cat([torch.arange(len(ids))[:, None], near], 1)  # [b, 1+k]
        group_ids = ids[groups]
        targets = tables.targets.rows(group_ids.flatten()).view(*group_ids.shape, -1)
        weights = self.group_weights(group_ids, tables, generator).to(images.device)
        return mix_groups(images[groups.to(images.device)], targets.to(images.device), weights)


def unwrap(model):
    """The module inside a DDP wrapper."""
    return getattr(model, "module", model)


def create_method(cfg) -> CrossEntropy:
    """The configured method object."""
    if cfg.method == "ce":
        return CrossEntropy()
    if cfg.method == "mixup":
        return Mixup(cfg.mixup_alpha)
    if cfg.method == "mixnn" and getattr(cfg, "knn_scope", "global") == "batch":
        return MixNNInBatch(cfg.k, cfg.weights)
    if cfg.method == "mixnn":
        return MixNN(cfg.k, cfg.weights, cfg.partners)
    raise ValueError(f"--method {cfg.method!r}: expected ce, mixup or mixnn")
