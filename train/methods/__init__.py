"""Training methods, one file a method, each a `Method` (train.methods.base: the interface and its defaults,
the per-sample tables' helpers, soft cross-entropy, the mixing helpers).

`METHODS` maps each `--method` name to its class; `create_method` builds the configured one and
`create_run_model` the model it trains. Adding a method is one file here and one line in `METHODS`
(docs/architecture.md shows an example).
"""
from __future__ import annotations

import numpy as np

from ..models import channels_last, create_model
from .base import (CRITERIA, CrossEntropy, EpochContext, Method, Steps, Tables, beta_draw, clean_weights, group_rows,
                   guess_temperature, guessed_targets, method_loss, mix_groups, prior_penalty, probability_loss,
                   sharpen_rows, soft_cross_entropy, unwrap)
from .dividemix import CoModel, DivideMix
from .mixnn import MixNN, MixNNInBatch
from .mixup import Mixup
from .select import ConfidentLearning, Select, SelectCorrect
from .selectmix import SelectMix

METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (
    CrossEntropy, Mixup, MixNN, SelectMix, Select, SelectCorrect, ConfidentLearning, DivideMix)}

__all__ = ["CRITERIA", "METHODS", "CoModel", "ConfidentLearning", "CrossEntropy", "DivideMix", "EpochContext",
           "Method", "MixNN", "MixNNInBatch", "Mixup", "Select", "SelectCorrect", "SelectMix", "Steps", "Tables",
           "beta_draw", "clean_weights", "create_method", "create_run_model", "group_rows", "guess_temperature",
           "guessed_targets", "method_class", "method_loss", "mix_groups", "prior_penalty", "probability_loss",
           "sharpen_rows", "soft_cross_entropy", "unwrap"]


def method_class(name: str) -> type[Method]:
    """The class registered as `name`."""
    if name not in METHODS:
        raise ValueError(f"--method {name!r}: expected one of {', '.join(METHODS)}")
    return METHODS[name]


def create_method(cfg, labels: np.ndarray | None = None, num_classes: int = 0, oos: np.ndarray | None = None) -> Method:
    """The configured method object; `labels` are the given labels by sample id, `oos` the out-of-sample
    probabilities of the cross-validation stage (methods with `cross_validation`)."""
    cls = method_class(cfg.method)
    if cls.cross_validation and oos is None:
        raise ValueError(f"--method {cfg.method} needs the out-of-sample probabilities of train.crossval")
    return cls.from_config(cfg, labels, num_classes, oos)


def create_run_model(cfg, num_classes: int, in_chans: int, **kwargs):
    """The model a run trains: the method's `build_model` around one timm model (train.models.create_model)."""
    make = lambda: channels_last(create_model(cfg.model, num_classes, in_chans, **kwargs), cfg.channels_last)
    return method_class(cfg.method).build_model(make)
