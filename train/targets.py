"""The per-sample state of a run, indexed by sample id: soft targets t (Eq. 12), kept small, and the
`Tables` an epoch refreshes (clean probabilities, neighbours, loss history); the soft-target math the
methods share (sharpening, Eq. 10/11 clean-probability weights).

Dense mode stores float16: 2 x C bytes per sample (CIFAR-10: 20 B; full WebVision 2.4M x 1000: 4.8 GB).
Top-k mode stores the k largest classes as (int32 class, float16 value): 6 x k bytes per sample
(full WebVision with k=10: 144 MB); the mass outside the top k is dropped and rows renormalised.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


class SoftTargets:
    """t starts as the one-hot given labels; `ema_rows` computes `a t + (1 - a) p` in storage form."""

    def __init__(self, labels: np.ndarray, num_classes: int, topk: int = 0):
        n = len(labels)
        self.num_classes = num_classes
        self.topk = min(topk, num_classes) if topk > 0 else 0
        labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        if self.topk:
            self.classes = torch.zeros(n, self.topk, dtype=torch.int32)
            self.classes[:, 0] = labels
            # the other slots hold distinct placeholder classes with zero mass
            filler = (labels[:, None] + torch.arange(1, self.topk)[None]) % num_classes
            self.classes[:, 1:] = filler.to(torch.int32)
            self.values = torch.zeros(n, self.topk, dtype=torch.float16)
            self.values[:, 0] = 1.0
        else:
            self.values = torch.zeros(n, num_classes, dtype=torch.float16)
            self.values[torch.arange(n), labels] = 1.0
        self._corrected = labels.numpy().copy()  # argmax t per id, kept current by `assign`

    @property
    def bytes_per_sample(self) -> int:
        return self.values.shape[1] * (2 + (4 if self.topk else 0))

    def rows(self, ids) -> torch.Tensor:
        """Dense float32 targets [len(ids), C] of the given sample ids."""
        ids = torch.as_tensor(ids, dtype=torch.long)
        values = self.values[ids].float()
        if not self.topk:
            return values
        dense = torch.zeros(len(ids), self.num_classes)
        return dense.scatter_add_(1, self.classes[ids].long(), values)

    def ema_rows(self, ids, probs: torch.Tensor, momentum: float) -> torch.Tensor:
        """New rows in storage form [n, k or C] (top-k: classes then values), for gathering: float16 values
        in dense mode (half the bytes on the wire), float32 in top-k mode (class ids must stay exact)."""
        if not self.topk:
            return (momentum * self.rows(ids) + (1.0 - momentum) * probs.float()).half()
        values, classes = self.topk_of_ema(ids, probs.float(), momentum)
        values = values / values.sum(1, keepdim=True).clamp_min(1e-12)
        return torch.cat([classes.float(), values.half().float()], dim=1)

    def topk_of_ema(self, ids, probs: torch.Tensor, momentum: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, classes) of the k largest entries of a t + (1 - a) p without building the dense rows: t has
        at most k non-zero classes, and every other class is (1 - a) p_c, so the top k lie among t's k slots and
        p's own top k. The values equal the dense computation's bit for bit (same products, same sums)."""
        ids = torch.as_tensor(ids, dtype=torch.long)
        old_classes, old_values = self.classes[ids].long(), self.values[ids].float()
        top_classes = probs.topk(self.topk, dim=1).indices
        candidates = torch.cat([old_classes, top_classes], dim=1)  # [n, 2k]
        values = (1.0 - momentum) * probs.gather(1, candidates)
        values[:, : self.topk] += momentum * old_values
        repeated = (top_classes[:, :, None] == old_classes[:, None, :]).any(2)  # already one of t's slots
        values[:, self.topk:] = values[:, self.topk:].masked_fill(repeated, -1.0)
        best, where = values.topk(self.topk, dim=1)
        return best, candidates.gather(1, where)

    def assign(self, ids, rows: torch.Tensor) -> None:
        """Write rows produced by `ema_rows` (possibly on another rank); the corrected labels of those ids follow."""
        ids = torch.as_tensor(ids, dtype=torch.long)
        if self.topk:
            self.classes[ids] = rows[:, : self.topk].round().to(torch.int32)
            self.values[ids] = rows[:, self.topk:].half()
        else:
            self.values[ids] = rows.half()
        self._corrected[ids.numpy()] = self.argmax(ids)

    def argmax(self, ids=None) -> np.ndarray:
        """argmax t of the given ids (all when None), computed from the stored rows."""
        values = self.values if ids is None else self.values[ids]
        best = values.argmax(1, keepdim=True)  # on the float16 rows: no float32 copy of an N x C table
        if self.topk:
            classes = self.classes if ids is None else self.classes[ids]
            return classes.gather(1, best).squeeze(1).long().numpy()
        return best.squeeze(1).long().numpy()

    def corrected(self) -> np.ndarray:
        """argmax t per sample id: the corrected label (kept current by `assign`: no pass over the N x C table).
        A copy: callers may keep it across updates."""
        return self._corrected.copy()

    def confidence(self) -> np.ndarray:
        """max t per sample id."""
        return self.values.max(1).values.float().numpy()

    def state_dict(self) -> dict:
        state = {"values": self.values, "topk": self.topk, "num_classes": self.num_classes}
        if self.topk:
            state["classes"] = self.classes
        return state

    def load_state_dict(self, state: dict) -> None:
        if state["topk"] != self.topk or state["num_classes"] != self.num_classes:
            raise ValueError("checkpoint soft targets were stored with another targets_topk / class count")
        self.values = state["values"].clone()
        if self.topk:
            self.classes = state["classes"].clone()
        self._corrected = self.argmax()


@dataclass
class Tables:
    """Per-sample tables of the epoch, indexed by sample id and identical on every rank."""

    targets: SoftTargets
    clean: np.ndarray | None = None  # [N] float32, P(clean | loss) from the last GMM
    partners: np.ndarray | None = None  # [N, K] int64 neighbour ids, -1 where none
    loss_history: np.ndarray | None = None  # [W, N] float32 per-sample losses of the last W refreshes


def sharpen_rows(p: torch.Tensor, temperature: float) -> torch.Tensor:
    """p^(1/T) renormalised per row."""
    powered = p.clamp_min(1e-12) ** (1.0 / temperature)
    return powered / powered.sum(1, keepdim=True)


def clean_weights(clean: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Eq. 10/11: lam, beta_k = p / sum(p) over (sample, neighbours); equal weights when all p ~ 0."""
    total = clean.sum(1, keepdim=True)
    equal = torch.full_like(clean, 1.0 / clean.shape[1])
    return torch.where(total > eps, (clean + eps / clean.shape[1]) / (total + eps), equal)
