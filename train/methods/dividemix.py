"""DivideMix (Li, Socher & Hoi, ICLR 2020) on the shared machinery: two networks in one `CoModel`, each
network's per-sample losses gathered by id into its own GMM, co-divide, MixMatch with label co-refinement
and co-guessing, as the authors' Train_cifar.py / Train_clothing1M.py / Train_webvision.py do.

An epoch: warm-up (CE, optionally the negative-entropy penalty) trains network 1 then network 2 over the
epoch's ids; after warm-up the refresh runs both networks over the epoch's ids (eval mode) and fits one GMM
per network, then network 1 trains on the division made by network 2's GMM and network 2 on network 1's,
one after the other, each with the other fixed. Every table is indexed by sample id and identical on every
rank; every step's randomness is seeded per (seed, epoch, step), so a resumed run draws the same.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from data.plan import EpochPlan, build_epoch_plan

from ..loop import RefreshStats, batched, eval_batch_size, refresh
from ..metrics import noise_detection
from ..results import EpochResult
from ..seeds import gmm_seed, network_rng, network_seed, step_generator
from ..tables import check_tables_identical, fit_losses, gather_losses, gmm_diagnostics, memorisation, refined_rows, \
    update_targets
from .base import EpochContext, Method, Steps, beta_draw, prior_penalty, sharpen_rows, soft_cross_entropy, unwrap

VIEWS = 2  # every sample is read twice per step: two augmentations (the authors' inputs_x, inputs_x2)


def rampup(cfg, progress: float) -> float:
    """lambda_u times the authors' linear ramp: 0 at the end of warm-up, full `rampup_epochs` later."""
    return cfg.lambda_u * float(np.clip((progress - cfg.warmup_epochs) / max(cfg.rampup_epochs, 1), 0.0, 1.0))


def negative_entropy(logits: torch.Tensor) -> torch.Tensor:
    """The warm-up confidence penalty: mean of sum p log p (asymmetric noise, Clothing1M)."""
    p = torch.softmax(logits.float(), 1)
    return (p * torch.log(p.clamp_min(1e-12))).sum(1).mean()


@dataclass
class DivideMixOptions:
    """DivideMix's options (Li et al. 2020). Defaults: the authors' Train_cifar.py; mixup's alpha is `mixup_alpha`."""

    section: ClassVar[str] = "dividemix"
    ranges: ClassVar[dict] = {"p_threshold": (lambda v: 0 <= v <= 1, "in [0, 1]"), "temperature": (lambda v: v > 0, "> 0"),
                              "lambda_u": (lambda v: v >= 0, ">= 0"), "rampup_epochs": (lambda v: v >= 1, ">= 1")}
    p_threshold: float = 0.5  # co-divide: labelled when the other network's P(clean) is above this
    temperature: float = 0.5  # sharpening T of the refined (labelled) and co-guessed (unlabelled) targets
    lambda_u: float = 25.0  # weight of the unlabelled loss (0: labelled mixup only, as for Clothing1M/WebVision)
    rampup_epochs: int = 16  # lambda_u ramps up linearly over this many epochs after warm-up
    warmup_penalty: bool = False  # negative-entropy penalty in warm-up (asymmetric noise, Clothing1M)


class CoModel(nn.Module):
    """Two networks as one module: `model(x)` is the sum of both networks' logits (the DivideMix authors'
    evaluation), `model(x, net=j)` network j's logits (the training forward, through DDP when wrapped).
    One module keeps evaluation, checkpoints and `accelerator.prepare` unchanged."""

    def __init__(self, first: nn.Module, second: nn.Module):
        super().__init__()
        self.nets = nn.ModuleList([first, second])

    def forward(self, x: torch.Tensor, net: int = -1) -> torch.Tensor:
        if net >= 0:
            return self.nets[net](x)
        return self.nets[0](x) + self.nets[1](x)


class DivideMix(Method):
    """Two networks; each epoch after warm-up, each network's GMM divides the data for the other, which trains
    with MixMatch on that division (see the module docstring). Its own state, indexed by sample id:
    `clean_per_net` [N, 2] (each network's P(clean)) and `loss_history` [2, W, N] (each network's last W
    refreshes' losses)."""

    name, title, uses_tables = "dividemix", "DivideMix", True
    find_unused_parameters = True  # a step trains one of the two networks
    options = (DivideMixOptions,)
    # the authors' Train_cifar.py: alpha 4, and the GMM on the last refresh's losses (they average 5 epochs
    # only at 90% noise)
    defaults = {"mixup_alpha": 4.0, "gmm_loss_window": 1}
    legacy_keys = ("clean_per_net", "loss_history")  # where checkpoints kept them before methods had an entry

    def __init__(self):
        self.clean_per_net: np.ndarray | None = None
        self.loss_history: np.ndarray | None = None

    @staticmethod
    def build_model(make):
        """Two independently initialised networks (drawn one after the other from the seeded global RNG)."""
        return CoModel(make(), make())

    def state_dict(self) -> dict:
        as_tensor = lambda a: None if a is None else torch.from_numpy(a)
        return {"clean_per_net": as_tensor(self.clean_per_net), "loss_history": as_tensor(self.loss_history)}

    def load_state_dict(self, state: dict) -> None:
        as_array = lambda t: None if t is None else t.numpy()
        self.clean_per_net = as_array(state.get("clean_per_net"))
        self.loss_history = as_array(state.get("loss_history"))

    def refresh(self, ctx: EpochContext) -> EpochResult:
        """After warm-up (not when resumed mid-epoch): both networks' GMMs, checked identical on every rank."""
        if ctx.warm or ctx.start_step:
            return EpochResult()
        result = refresh_division(ctx, self)
        check_tables_identical(ctx.tables, extra=(self.clean_per_net,))
        return result.add({"tables_checked_ranks": ctx.world}, "train")

    def steps(self, ctx: EpochContext) -> Steps:
        """Network 1's steps then network 2's, one after the other (each with the other fixed)."""
        phases, batches = [], []
        for net in (0, 1):
            if ctx.warm:
                steps = network_steps(ctx, net, ctx.plan.unique_ids)
                loss = warmup_loss(ctx, net)
            else:
                labelled, unlabelled = division(self.clean_per_net, ctx.plan.unique_ids, net, ctx.cfg.p_threshold)
                steps = network_steps(ctx, net, labelled, unlabelled)
                loss = mixmatch_loss(ctx, net, self.clean_per_net, len(batches), len(steps),
                                     with_unlabelled=len(unlabelled) > 0)
            phases.append((len(batches), loss))
            batches += steps
        return Steps(batches, by_step(phases), ctx.data.train, self)


# ----------------------------------------------------------------------------- refresh and co-divide

def refresh_division(ctx: EpochContext, state: DivideMix) -> EpochResult:
    """Both networks' eval-mode pass over the epoch's ids -> per-network losses against the given labels,
    gathered by id -> one GMM per network (`state.clean_per_net`). `tables.clean` (report, metrics) is their
    mean, and the soft targets hold the refined label w y + (1 - w) p of the two networks' mean p (what the
    label report proposes; DivideMix itself does not keep targets between epochs)."""
    cfg, data, tables, accelerator = ctx.cfg, ctx.data, ctx.tables, ctx.accelerator
    t0 = time.perf_counter()
    co = accelerator.unwrap_model(ctx.model)
    ids = ctx.plan.refresh_slice(ctx.rank)
    batches = batched(ids, eval_batch_size(cfg, accelerator))
    stats = [refresh(net, data.train_plain, batches, accelerator, cfg.workers) for net in co.nets]
    t1 = time.perf_counter()
    history = state.loss_history if state.loss_history is not None else [None, None]
    fits = [fit_losses(cfg, gather_losses(s, data.train.labels), history[j], gmm_seed(cfg.seed, ctx.epoch, j),
                       accelerator.is_main_process, data.train.labels) for j, s in enumerate(stats)]  # (history, losses, clean, fit) per network
    state.loss_history = None if fits[0][0] is None else np.stack([f[0] for f in fits])
    per_net = np.stack([f[2] for f in fits], 1)
    state.clean_per_net, tables.clean = per_net, per_net.mean(1)
    ensemble = RefreshStats(stats[0].ids, (stats[0].probs + stats[1].probs) / 2, stats[0].embeddings)
    update_targets(tables, ensemble, refined_rows(ensemble.probs, ensemble.ids, data.train.labels, tables.clean), 0.0)
    result = EpochResult().add({"time_refresh": t1 - t0, "time_gmm": time.perf_counter() - t1}, "time")
    result.add(division_metrics(cfg, per_net, data, ctx.plan.unique_ids), "dividemix")
    result.add(memorisation(ensemble, data.train), "memorisation")
    result.reads = stats[0].reads + stats[1].reads
    return result.merge(gmm_diagnostics(fits[0][3], fits[0][1], data.train))  # network 1's mixture


def division_metrics(cfg, per_net: np.ndarray, data, ids: np.ndarray) -> dict:
    """Size of each network's labelled set (made by the other network), agreement of the two divisions,
    and each network's noise detection against the true labels where known."""
    clean = per_net[ids] > cfg.p_threshold
    out = {"dividemix_labelled_fraction_net1": float(clean[:, 1].mean()),
           "dividemix_labelled_fraction_net2": float(clean[:, 0].mean()),
           "dividemix_division_agreement": float((clean[:, 0] == clean[:, 1]).mean())}
    for j in range(2):
        found = noise_detection(per_net[:, j], data.train.labels, data.train.true_labels, ids)
        out.update({f"{k}_net{j + 1}": v for k, v in found.items()})
    return out


def division(clean_per_net: np.ndarray, ids: np.ndarray, net: int, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """(labelled, unlabelled) ids for training network `net`: co-divide by the *other* network's P(clean)."""
    clean = clean_per_net[ids, 1 - net] > threshold
    return ids[clean], ids[~clean]


# ----------------------------------------------------------------------------- steps

def network_steps(ctx: EpochContext, net: int, ids: np.ndarray, unlabelled: np.ndarray | None = None) -> list[np.ndarray]:
    """This rank's id batches for training network `net` over `ids`, a shuffled pass in its own order per
    network. Warm-up (`unlabelled` None): each id once. After warm-up each id is read twice (two
    augmentations) and, when there are unlabelled ids, each batch carries as many of them, drawn from a
    shuffled cycle of `unlabelled`, also read twice: [x, x, u, u]."""
    if len(ids) == 0:
        return []
    cfg = ctx.cfg
    plan = build_epoch_plan(ctx.data.train.labels, seed=network_seed(cfg.seed, net), epoch=ctx.epoch,
                            batch_size=cfg.batch_size, world_size=ctx.world, subset=ids)
    labelled = plan.batches(ctx.rank)
    if unlabelled is None:
        return labelled
    if len(unlabelled) == 0:
        return [np.concatenate([b] * VIEWS) for b in labelled]
    cycle = np.resize(network_rng(cfg.seed, ctx.epoch, net).permutation(unlabelled), len(plan.ids))
    drawn = EpochPlan(cycle.astype(np.int64), cfg.batch_size, ctx.world).batches(ctx.rank)
    return [np.concatenate([b] * VIEWS + [u] * VIEWS) for b, u in zip(labelled, drawn)]


def views(batch: dict, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(view 1 images, view 2 images, ids) of the `count` samples read twice from row `start`, keeping the
    samples whose both reads decoded."""
    rows = slice(start, start + VIEWS * count)
    images = batch["images"][rows].view(VIEWS, count, *batch["images"].shape[1:])
    ok = batch["valid"][rows].view(VIEWS, count).all(0)
    return images[0][ok], images[1][ok], batch["ids"][start:start + count][ok.to(batch["ids"].device)]


def warmup_loss(ctx: EpochContext, net: int):
    """CE of network `net` on the given labels, plus the confidence penalty when configured."""
    model, labels, penalty = ctx.model, ctx.data.train.labels, ctx.cfg.warmup_penalty

    def step_loss(batch, step):
        valid = batch["valid"].to(batch["images"].device)
        x, ids = batch["images"][valid], batch["ids"][batch["valid"]]
        logits = model(x, net=net).float()
        loss = F.cross_entropy(logits, torch.from_numpy(labels[ids.numpy()]).to(logits.device))
        return (loss + negative_entropy(logits) if penalty else loss), len(x)
    return step_loss


def mixmatch_loss(ctx: EpochContext, net: int, clean_per_net: np.ndarray, first_step: int, steps: int,
                  with_unlabelled: bool):
    """One DivideMix step for network `net` (the other fixed, in eval mode): label co-refinement of the
    labelled, co-guessing of the unlabelled, mixup over all of them with lambda' = max(lambda, 1 - lambda),
    L_x + lambda_u(ramp) L_u + the prior penalty. With lambda_u = 0 only the labelled half is mixed and
    trained on (the authors' Clothing1M / WebVision scripts). The phase's steps are `first_step` onwards."""
    cfg, model, labels, seed = ctx.cfg, ctx.model, ctx.data.train.labels, ctx.seed
    num_classes = ctx.data.manifest["num_classes"]
    co = unwrap(model)
    own, other = co.nets[net], co.nets[1 - net]

    def step_loss(batch, step):
        b = len(batch["ids"]) // (2 * VIEWS if with_unlabelled else VIEWS)
        x1, x2, x_ids = views(batch, 0, b)
        u1, u2, _ = views(batch, VIEWS * b, b) if with_unlabelled else (x1[:0], x2[:0], None)
        if not len(x1):
            return None, 0
        own.train()
        other.eval()
        with torch.no_grad():
            w = torch.from_numpy(clean_per_net[x_ids.numpy(), 1 - net]).float()[:, None].to(x1.device)
            given = F.one_hot(torch.from_numpy(labels[x_ids.numpy()]), num_classes).float().to(x1.device)
            px = (torch.softmax(own(x1).float(), 1) + torch.softmax(own(x2).float(), 1)) / 2
            tx = sharpen_rows(w * given + (1 - w) * px, cfg.temperature)
            tu = tx[:0]
            if len(u1):
                pu = sum(torch.softmax(m(u).float(), 1) for m in (own, other) for u in (u1, u2)) / 4
                tu = sharpen_rows(pu, cfg.temperature)
        generator = step_generator(seed, step)
        lam = float(beta_draw(cfg.mixup_alpha, generator))
        lam = max(lam, 1 - lam)
        inputs, targets = torch.cat([x1, x2, u1, u2]), torch.cat([tx, tx, tu, tu])
        perm = torch.randperm(len(inputs), generator=generator).to(inputs.device)
        mixed, mixed_t = lam * inputs + (1 - lam) * inputs[perm], lam * targets + (1 - lam) * targets[perm]
        labelled = 2 * len(x1)
        if cfg.lambda_u == 0:
            mixed, mixed_t = mixed[:labelled], mixed_t[:labelled]
        logits = model(mixed, net=net).float()
        loss = soft_cross_entropy(logits[:labelled], mixed_t[:labelled]) + prior_penalty(logits)
        if len(logits) > labelled:
            l_u = ((torch.softmax(logits[labelled:], 1) - mixed_t[labelled:]) ** 2).mean()
            loss = loss + rampup(cfg, ctx.epoch + (step - first_step) / max(steps, 1)) * l_u
        return loss, len(x1)
    return step_loss


def by_step(phases: list[tuple[int, object]]):
    """One step-loss function over consecutive phases [(first step, step loss), ...] (network 1, then 2)."""
    def step_loss(batch, step):
        return next(loss for first, loss in reversed(phases) if step >= first)(batch, step)
    return step_loss
