"""MixNN (Lu & He): mix each sample with its nearest neighbours, weighted by GMM clean probabilities."""
from __future__ import annotations

import numpy as np
import torch

from index.knn import knn_in_batch

from .base import CrossEntropy, Tables, clean_weights, group_rows, mix_groups, unwrap


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
