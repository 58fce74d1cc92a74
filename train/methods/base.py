"""What every method shares: the per-sample tables, soft cross-entropy, mixing helpers and plain CE.

A batch holds `b` anchors followed by their `b x P` partners (P = `num_partners`), all read by sample
id in one loader step, so the partners' images are prefetched with the anchors.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..targets import SoftTargets


@dataclass
class Tables:
    """Per-sample tables of the epoch, indexed by sample id and identical on every rank."""

    targets: SoftTargets
    clean: np.ndarray | None = None  # [N] float32, P(clean | loss) from the last GMM
    partners: np.ndarray | None = None  # [N, K] int64 neighbour ids, -1 where none
    loss_history: np.ndarray | None = None  # [W, N] float32 per-sample losses of the last W refreshes
    #                                           (DivideMix: [2, W, N], one history per network)
    clean_per_net: np.ndarray | None = None  # [N, 2] DivideMix: P(clean) from each network's own GMM


def beta_draw(alpha: float, generator: torch.Generator, size: int | None = None):
    """lambda ~ Beta(alpha, alpha) (one float, or an array of `size`), seeded from the step's `generator` so
    a resumed run draws the same."""
    seed = int(torch.randint(2**31, (1,), generator=generator))
    return np.random.default_rng(seed).beta(alpha, alpha, size=size)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Eq. 7: mean over the batch of -sum_c y_c log softmax(logits)_c."""
    return -(targets * F.log_softmax(logits.float(), dim=1)).sum(1).mean()


def probability_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of -sum_c y_c softmax(logits)_c: a bounded loss in [-1, 0] that a wrong label pulls
    on less than cross-entropy does (the MixNN authors' `F.nll_loss` on softmax probabilities before E_s)."""
    return -(targets * torch.softmax(logits.float(), dim=1)).sum(1).mean()


CRITERIA = {"ce": soft_cross_entropy, "prob": probability_loss}


def sharpen_rows(p: torch.Tensor, temperature: float) -> torch.Tensor:
    """p^(1/T) renormalised per row."""
    powered = p.clamp_min(1e-12) ** (1.0 / temperature)
    return powered / powered.sum(1, keepdim=True)


def prior_penalty(logits: torch.Tensor) -> torch.Tensor:
    """KL(uniform || mean prediction): DivideMix's regulariser against predicting one class for everything."""
    mean = torch.softmax(logits.float(), 1).mean(0)
    prior = torch.full_like(mean, 1.0 / len(mean))
    return (prior * torch.log(prior / mean.clamp_min(1e-12))).sum()


def guessed_targets(model, images: torch.Tensor, targets: torch.Tensor, noisy: torch.Tensor,
                    temperature: float) -> torch.Tensor:
    """`targets` with the rows of the `noisy` samples replaced by the network's current prediction of their
    un-mixed images, sharpened with `temperature` (DivideMix's label guessing with one network and one view).
    One no-grad forward in train mode over all of `images`, so BatchNorm sees the whole batch (a single noisy
    sample alone would be a batch of one); the noisy rows are kept. `images` [..., C, H, W], `targets`
    [..., C], `noisy` [...] bool."""
    if model is None or not bool(noisy.any()):
        return targets
    with torch.no_grad():
        flat = images.flatten(0, noisy.dim() - 1)
        p = torch.softmax(unwrap(model)(flat).float(), 1)[noisy.flatten().to(flat.device)]
    out = targets.clone()
    out[noisy.to(out.device)] = sharpen_rows(p, temperature).to(out.device, out.dtype)
    return out


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
    uses_tables = False  # True: the epoch refreshes the per-sample tables (GMM, targets, neighbours) first
    criterion = "ce"  # the per-step loss of (logits, targets): a CRITERIA key

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The step's loss of the mixed inputs' logits against their soft targets (Eq. 7 unless `criterion`)."""
        return CRITERIA[self.criterion](logits, targets)

    def train_ids(self, ids: np.ndarray, tables: Tables) -> np.ndarray | None:
        """The ids this epoch trains on, when the method keeps only some of the epoch's ids (else None)."""
        return None

    def partner_ids(self, anchors: np.ndarray, tables: Tables, epoch_ids: np.ndarray, rng) -> np.ndarray:
        return np.zeros((len(anchors), 0), dtype=np.int64)

    def epoch_metrics(self, true_labels: np.ndarray) -> dict:
        """Method-specific metrics of the epoch (e.g. SelectMix's uncertain set against the truth)."""
        return {}

    def inputs_targets(self, batch: dict, tables: Tables, generator: torch.Generator, model=None):
        images, ids, valid = group_rows(batch, 0)
        ids = ids[valid, 0]
        return images[valid, 0], tables.targets.rows(ids.cpu()).to(images.device)


def unwrap(model):
    """The module inside a DDP wrapper."""
    return getattr(model, "module", model)
