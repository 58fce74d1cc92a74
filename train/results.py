"""The typed result of an epoch (or of a part of it, e.g. its refresh): what the loop logs and acts on."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class EpochResult:
    """What an epoch (or a part of it) produced: scalars for summary.csv and TensorBoard, figures for
    TensorBoard, this rank's unreadable training ids, where a preempted pass stopped (None: it ran to
    its end), and this rank's image reads of the training split (JPEG decodes, cache reads). Every
    scalar's TensorBoard group is declared by whoever adds it (`add(values, group)`: eval, train, time,
    noise, gmm, labels, neighbours, memorisation, data, or a method's own name)."""

    scalars: dict = field(default_factory=dict)
    figures: dict = field(default_factory=dict)  # TensorBoard tag -> function of the epoch returning a figure
    groups: dict = field(default_factory=dict)  # scalar name -> TensorBoard group
    unreadable_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    stopped_at: int | None = None
    reads: np.ndarray = field(default_factory=lambda: np.zeros(2, np.int64))  # this rank's [decodes, cache reads]

    def add(self, values: dict, group: str, figures: dict | None = None) -> "EpochResult":
        """`values` (name -> scalar) under TensorBoard group `group`; `figures` beside them."""
        self.scalars.update(values)
        self.groups.update(dict.fromkeys(values, group))
        self.figures.update(figures or {})
        return self

    def merge(self, other: "EpochResult") -> "EpochResult":
        self.scalars.update(other.scalars)
        self.groups.update(other.groups)
        self.figures.update(other.figures)
        self.reads = self.reads + other.reads
        return self
