"""Soft targets t (Eq. 12), one row per sample id, kept small.

Dense mode stores float16: 2 x C bytes per sample (CIFAR-10: 20 B; full WebVision 2.4M x 1000: 4.8 GB).
Top-k mode stores the k largest classes as (int32 class, float16 value): 6 x k bytes per sample
(full WebVision with k=10: 144 MB); the mass outside the top k is dropped and rows renormalised.
"""
from __future__ import annotations

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
        """New rows in storage form, concatenated [n, k or C] (classes first in top-k mode), for gathering."""
        mixed = momentum * self.rows(ids) + (1.0 - momentum) * probs.float()
        if not self.topk:
            return mixed.half().float()
        values, classes = mixed.topk(self.topk, dim=1)
        values = values / values.sum(1, keepdim=True).clamp_min(1e-12)
        return torch.cat([classes.float(), values.half().float()], dim=1)

    def assign(self, ids, rows: torch.Tensor) -> None:
        """Write rows produced by `ema_rows` (possibly on another rank)."""
        ids = torch.as_tensor(ids, dtype=torch.long)
        if self.topk:
            self.classes[ids] = rows[:, : self.topk].round().to(torch.int32)
            self.values[ids] = rows[:, self.topk:].half()
        else:
            self.values[ids] = rows.half()

    def corrected(self) -> np.ndarray:
        """argmax t per sample id: the corrected label."""
        if self.topk:
            best = self.values.float().argmax(1, keepdim=True)
            return self.classes.gather(1, best).squeeze(1).long().numpy()
        return self.values.float().argmax(1).numpy()

    def confidence(self) -> np.ndarray:
        """max t per sample id."""
        return self.values.float().max(1).values.numpy()

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
