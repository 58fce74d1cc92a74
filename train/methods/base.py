"""What every method shares: the method interface, the per-sample tables, soft cross-entropy, mixing
helpers and plain CE.

A method is one class (registered by name in `train.methods.METHODS`). `Method` gives every hook a small
default, so a method writes only what it changes:

- class attributes: `name`; `options` (dataclasses, declared in its file, of the config keys only it reads)
  and `defaults` (its values of the keys left at `auto`); `cross_validation` (a K-fold stage before the
  first epoch gives it out-of-sample probabilities); `find_unused_parameters` (DDP: a step trains part of
  the model); `guesses` (`--guess`).
- `from_config(cfg, labels, num_classes, oos)` builds it; `build_model(make)` its model from `make()`;
  `check_config(cfg)` refuses settings it cannot run together.
- per epoch, called by `train.epoch.run_epoch` with an `EpochContext`: `refresh(ctx)` fills the per-sample
  tables before the training pass (default: the GMM / targets / neighbours refresh after warm-up) and returns
  an `EpochResult`; `steps(ctx)` lays out the training pass (`Steps`: this rank's id batches and the
  per-step loss); `epoch_metrics(true_labels)` adds its own scalars.
- per step (the default `steps`): `for_epoch(cfg, epoch)` is the method an epoch trains with (CE during
  warm-up), `train_ids` the ids it keeps, `partner_ids` the ids read with each anchor, `inputs_targets`
  the mixed inputs and soft targets, `loss` the criterion.
- `state_dict()` / `load_state_dict()`: its own checkpoint entry (state outside the shared tables).

A batch holds `b` anchors followed by their `b x P` partners (P = `num_partners`), all read by sample
id in one loader step, so the partners' images are prefetched with the anchors.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from data.plan import EpochPlan, build_epoch_plan, pad_to_batches

from ..results import EpochResult
from ..seeds import partner_rng, rank_seed, step_generator
from ..tables import check_tables_identical, memorisation_pass, refresh_due, refresh_tables
from ..targets import Tables, clean_weights, sharpen_rows  # noqa: F401 - re-exported for the methods


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


def group_rows(batch: dict, partners: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split a flat loader batch into (images [b, 1+P, ...], ids [b, 1+P], usable [b]) groups."""
    n = len(batch["valid"]) // (1 + partners)
    order = lambda t: t.view(1 + partners, n, *t.shape[1:]).transpose(0, 1)  # anchors first, then P blocks
    valid = order(batch["valid"]).all(1)
    return order(batch["images"]), order(batch["ids"]), valid


@dataclass
class EpochContext:
    """What an epoch hands its method's hooks: the run's objects, the epoch's plan and where it starts."""

    cfg: object  # train.config.Config
    epoch: int
    model: torch.nn.Module
    data: object  # train.dataset.Data
    tables: Tables
    accelerator: object
    plan: EpochPlan | None = None  # the epoch's ids (every rank's)
    start_step: int = 0  # > 0: resumed mid-epoch (the tables are the checkpoint's; no refresh)

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def warm(self) -> bool:
        """A warm-up epoch."""
        return self.epoch < self.cfg.warmup_epochs

    @property
    def seed(self) -> int:
        """This rank's training-pass seed (augmentation and mixing draws)."""
        return rank_seed(self.cfg.seed, self.epoch, self.rank)

    def plan_of(self, ids: np.ndarray | None) -> EpochPlan:
        """The epoch's plan over `ids` (None: the whole training set)."""
        cfg = self.cfg
        return build_epoch_plan(self.data.train.labels, seed=cfg.seed, epoch=self.epoch, batch_size=cfg.batch_size,
                                world_size=self.world, num_batches=cfg.num_batches, subset=ids)


@dataclass
class Steps:
    """An epoch's training pass as its method lays it out: this rank's id batches (every step of the epoch,
    anchors then partners), the per-step loss `(batch, step) -> (loss, images counted)`, the dataset they
    are read from, the method they train with (its `epoch_metrics`), what is known before the pass
    (`result`), and `finish()` -> scalars of the soft targets once the pass is over."""

    batches: list[np.ndarray]
    step_loss: Callable
    dataset: object
    method: "Method"
    result: EpochResult = field(default_factory=EpochResult)
    finish: Callable[[], dict] | None = None


class Method:
    """The method interface, with the defaults plain cross-entropy needs (see the module docstring)."""

    name, num_partners = "", 0
    title = ""  # the method's name in messages (default: `name`)
    uses_tables = False  # True: the default refresh runs the GMM / targets / neighbours after warm-up
    criterion = "ce"  # the per-step loss of (logits, targets): a CRITERIA key
    cross_validation = False  # True: `from_config` gets the K-fold stage's out-of-sample probabilities
    find_unused_parameters = False  # True: DDP is told that a step leaves some parameters without gradient
    guesses = False  # True: `--guess online` applies (targets of noisy samples guessed online)
    options: tuple = ()  # dataclasses of the config keys only this method reads (its file declares them; another
    #                      method given one: an error; train.config adds their fields to Config)
    defaults: dict = {}  # this method's values of the keys left at `auto` (train.config.AUTO_DEFAULTS)
    legacy_keys: tuple = ()  # checkpoint keys of older versions that hold this method's own state

    @classmethod
    def from_config(cls, cfg, labels: np.ndarray, num_classes: int, oos: np.ndarray | None = None) -> "Method":
        return cls()

    @classmethod
    def check_config(cls, cfg) -> None:
        """Raise train.config.ConfigError for settings this method cannot run together (after `auto` is
        resolved)."""

    @staticmethod
    def build_model(make: Callable[[], torch.nn.Module]) -> torch.nn.Module:
        """The model the method trains, from `make()` (one seeded network)."""
        return make()

    # ------------------------------------------------------------------ epoch level
    def refresh(self, ctx: EpochContext) -> EpochResult:
        """Before the training pass: the per-sample tables refreshed (after warm-up, when due, not when resumed
        mid-epoch), checked identical on every rank; otherwise the memorisation pass when due."""
        cfg, result = ctx.cfg, EpochResult()
        if not ctx.warm and self.uses_tables and ctx.start_step == 0 and refresh_due(cfg, ctx.epoch, ctx.tables):
            result.merge(refresh_tables(ctx))
            t0 = time.perf_counter()
            check_tables_identical(ctx.tables)
            result.add({"tables_checked_ranks": ctx.world}, "train").add({"time_check": time.perf_counter() - t0}, "time")
        elif memorisation_due(cfg, ctx.epoch):
            result.merge(memorisation_pass(cfg, ctx.model, ctx.data, ctx.plan, ctx.accelerator))
        return result

    def steps(self, ctx: EpochContext) -> Steps:
        """The epoch's pass: the ids the method keeps (`train_ids`), the method of the epoch (`for_epoch`),
        each anchor batch with its partners' ids (`partner_ids`), and `method_loss` of that method."""
        cfg, plan, result = ctx.cfg, ctx.plan, EpochResult()
        keep = self.train_ids(plan.unique_ids, ctx.tables) if not ctx.warm else None
        if keep is not None:  # the method trains on part of the epoch's ids (selection baselines)
            result.add({"train_fraction": len(keep) / max(len(plan.unique_ids), 1)}, "train")
            plan = ctx.plan_of(keep)
        method = self.for_epoch(cfg, ctx.epoch)
        plan, dataset = warmup_plan(ctx, plan)
        t0 = time.perf_counter()
        batches = partner_batches(ctx, plan, method)
        result.add({"time_partners": time.perf_counter() - t0}, "time")
        step_loss = method_loss(method, ctx.tables, ctx.seed, ctx.model, prior=cfg.prior_penalty and not ctx.warm)
        return Steps(batches, step_loss, dataset, method, result, finish=method.finish(ctx.tables))

    def finish(self, tables: Tables) -> Callable[[], dict] | None:
        """What runs once the epoch's pass is over (None: nothing)."""
        return None

    def state_dict(self) -> dict:
        """The method's own checkpoint entry (state outside the shared tables)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def epoch_metrics(self, true_labels: np.ndarray) -> dict:
        """Method-specific metrics of the epoch (e.g. SelectMix's uncertain set against the truth)."""
        return {}

    # ------------------------------------------------------------------ step level
    def for_epoch(self, cfg, epoch: int) -> "Method":
        """The method an epoch trains with: plain cross-entropy during warm-up, then the method itself."""
        return CrossEntropy() if epoch < cfg.warmup_epochs else self

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The step's loss of the mixed inputs' logits against their soft targets (Eq. 7 unless `criterion`)."""
        return CRITERIA[self.criterion](logits, targets)

    def train_ids(self, ids: np.ndarray, tables: Tables) -> np.ndarray | None:
        """The ids this epoch trains on, when the method keeps only some of the epoch's ids (else None)."""
        return None

    def partner_ids(self, anchors: np.ndarray, tables: Tables, epoch_ids: np.ndarray, rng) -> np.ndarray:
        return np.zeros((len(anchors), 0), dtype=np.int64)

    def inputs_targets(self, batch: dict, tables: Tables, generator: torch.Generator, model=None):
        images, ids, valid = group_rows(batch, 0)
        ids = ids[valid, 0]
        return images[valid, 0], tables.targets.rows(ids.cpu()).to(images.device)


class CrossEntropy(Method):
    """Plain cross-entropy against the current targets (one-hot given labels unless corrected)."""

    name = "ce"


def guess_temperature(cfg) -> float | None:
    """The sharpening temperature of `--guess online` (None: off)."""
    return cfg.sharpen if getattr(cfg, "guess", "none") == "online" else None


def memorisation_due(cfg, epoch: int) -> bool:
    """Methods without a refresh pass measure memorisation every `memorisation_every` epochs and at the end."""
    every = cfg.memorisation_every
    return every > 0 and ((epoch + 1) % every == 0 or epoch + 1 == cfg.epochs)


def single_class_share(labels: np.ndarray, batch_size: int, most: int = 2000) -> float:
    """The mean share of the most frequent given label in consecutive id batches (`warmup_data: plain`'s
    batches; at most `most` of them, evenly spaced): ~1/C for ids in an arbitrary order, near 1 when the
    ids run class by class."""
    batches = np.array_split(labels, max(len(labels) // max(batch_size, 1), 1))
    batches = [batches[i] for i in np.unique(np.linspace(0, len(batches) - 1, most).astype(np.int64))]
    shares = [np.bincount(b[b >= 0]).max() / int((b >= 0).sum()) for b in batches if (b >= 0).any()]
    return float(np.mean(shares)) if shares else 0.0


def warmup_order_warning(cfg, labels: np.ndarray) -> str:
    """A warning (or "") when `warmup_data: plain` would warm up on batches of mostly one class: the sample ids
    of a split prepared from class-sorted lists or folders (WebVision's file lists, `data.prepare folder`)
    run class by class, and the authors' un-shuffled warm-up assumes an order like CIFAR's."""
    known = labels[labels >= 0]
    if cfg.warmup_epochs <= 0 or cfg.warmup_data != "plain" or len(known) == 0:
        return ""
    share = single_class_share(labels, cfg.batch_size)
    largest = np.bincount(known).max() / len(known)
    if share < 0.5 or share < 2 * largest:
        return ""
    return (f"warmup_data plain: the training split's sample ids run class by class (the largest class of a "
            f"{cfg.batch_size}-id batch in id order holds {share:.0%} of it on average), so the warm-up would train "
            "on batches of mostly one class; pass --warmup_data augmented to warm up on shuffled batches")


def warmup_plan(ctx: EpochContext, plan: EpochPlan):
    """(plan, dataset) of the training pass: with `warmup_data: plain`, a warm-up epoch reads every sample in
    id order through the eval transform (the MixNN authors warm up on their un-shuffled, un-augmented
    loader); otherwise `plan` through the train transform."""
    if not ctx.warm or ctx.cfg.warmup_data != "plain":
        return plan, ctx.data.train
    ids = pad_to_batches(np.arange(len(ctx.data.train), dtype=np.int64), plan.batch_size)
    return EpochPlan(ids, plan.batch_size, plan.world_size), ctx.data.train_plain


def partner_batches(ctx: EpochContext, plan: EpochPlan, method: Method) -> list[np.ndarray]:
    """Per step: this rank's anchor ids followed by their partners' ids (read together, prefetched)."""
    rng = partner_rng(ctx.cfg.seed, ctx.epoch, ctx.rank)
    out = []
    for anchors in plan.batches(ctx.rank):
        partners = method.partner_ids(anchors, ctx.tables, plan.unique_ids, rng)
        out.append(np.concatenate([anchors, partners.T.reshape(-1)]))
    return out


def method_loss(method: Method, tables: Tables, seed: int, model, prior: bool = False):
    """The per-step loss of a mixing method: its mixed inputs and soft targets, its loss (soft CE, Eq. 7), plus
    the prior penalty when `prior`. The mixing RNG is seeded per (seed, step), so a run resumed mid-epoch
    draws what it would have drawn."""
    def step_loss(batch: dict, step: int):
        inputs, targets = method.inputs_targets(batch, tables, step_generator(seed, step), model=model)
        if not len(inputs):
            return None, 0
        logits = model(inputs)
        loss = method.loss(logits, targets.to(inputs.device))
        return (loss + prior_penalty(logits) if prior else loss), len(inputs)
    return step_loss


def unwrap(model):
    """The module inside a DDP wrapper."""
    return getattr(model, "module", model)
