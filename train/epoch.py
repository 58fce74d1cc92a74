"""One epoch of Algorithm 1 for every method: plan, refresh of the tables, training pass, evaluation."""
from __future__ import annotations

import copy
import resource
import time

import numpy as np

from data.plan import EpochPlan, build_epoch_plan, epoch_rng, pad_to_batches
from data.reader import id_loader
from index.comm import all_gather_rows

from .config import Config
from .dataset import Data
from .loop import eval_batch_size, evaluate, method_loss, train_one_epoch
from .methods import CrossEntropy, MixNNInBatch, Mixup, Tables
from .tables import (apply_step_updates, check_tables_identical, correction_due, memorisation_pass, refresh_due,
                     refresh_tables, table_metrics)


def train_batches(cfg, epoch, plan, method, tables, rank) -> list[np.ndarray]:
    """Per step: this rank's anchor ids followed by their partners' ids (read together, prefetched)."""
    rng = epoch_rng(cfg.seed, epoch, stream=2 + rank)
    out = []
    for anchors in plan.batches(rank):
        partners = method.partner_ids(anchors, tables, plan.unique_ids, rng)
        out.append(np.concatenate([anchors, partners.T.reshape(-1)]))
    return out


def epoch_method(cfg: Config, epoch: int, method):
    """The method an epoch trains with: CE during warm-up; with `mix_start: correction`, MixNN trains as
    plain mixup (random in-batch partner) until E_s (`after_correction`: through E_s, neighbours from E_s + 1, the
    MixNN authors' `epoch > es`; with in-batch neighbours those steps keep the un-mixed forward); with `early_loss`,
    MixNN's loss before E_s is that criterion (the authors': -p[label])."""
    if epoch < cfg.warmup_epochs:
        return CrossEntropy()
    early = method.name == "mixnn" and epoch < max(cfg.correction_epoch, 0)
    plain_until = cfg.correction_epoch + (cfg.mix_start == "after_correction")  # E_s, or through E_s itself
    if method.name == "mixnn" and cfg.mix_start in ("correction", "after_correction") and epoch < plain_until:
        method = method.plain_mixing(cfg.mixup_alpha) if isinstance(method, MixNNInBatch) else Mixup(cfg.mixup_alpha)
    if early and cfg.early_loss != method.criterion:
        method = copy.copy(method)
        method.criterion = cfg.early_loss
    if cfg.target_update == "step" and method.name == "mixnn" and correction_due(cfg, epoch):
        method = copy.copy(method)
        method.step_momentum, method.step_updates = cfg.ema, []
    return method


def warmup_plan(cfg: Config, epoch: int, plan, data: Data):
    """(plan, dataset) of the training pass: with `warmup_data: plain`, a warm-up epoch reads every sample in
    id order through the eval transform (the MixNN authors warm up on their un-shuffled, un-augmented
    loader); otherwise the epoch's plan through the train transform."""
    if epoch >= cfg.warmup_epochs or cfg.warmup_data != "plain":
        return plan, data.train
    ids = pad_to_batches(np.arange(len(data.train), dtype=np.int64), plan.batch_size)
    return EpochPlan(ids, plan.batch_size, plan.world_size), data.train_plain


def memorisation_due(cfg: Config, epoch: int) -> bool:
    """Methods without a refresh pass measure memorisation every `memorisation_every` epochs and at the end."""
    every = cfg.memorisation_every
    return every > 0 and ((epoch + 1) % every == 0 or epoch + 1 == cfg.epochs)


def pass_totals(stats: dict) -> dict:
    """A training pass's statistics summed (images, skips, unreadable ids) or maxed (RSS) over the ranks."""
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    totals = np.concatenate(all_gather_rows(np.array([[stats["train_images"], stats["skipped_train"], peak_mb]])))
    unreadable = np.unique(np.concatenate(all_gather_rows(stats["unreadable_ids"])))
    return {**stats, "unreadable_ids": unreadable,
            "images_per_second": float(totals[:, 0].sum() / max(stats["train_seconds"], 1e-9)),
            "skipped_train": int(totals[:, 1].sum()), "peak_rss_mb_per_rank": int(totals[:, 2].max())}


def run_epoch(cfg: Config, epoch: int, model, optimizer, method, data: Data, tables: Tables, accelerator,
              stop=None, start_step: int = 0, subset=None) -> dict:
    """One epoch of Algorithm 1 (warm-up epochs: plain cross-entropy, no refresh). A run resumed
    mid-epoch (`start_step > 0`) keeps the tables of its checkpoint and skips the steps already done."""
    started = time.perf_counter()
    rank, world = accelerator.process_index, accelerator.num_processes
    make_plan = lambda ids: build_epoch_plan(data.train.labels, seed=cfg.seed, epoch=epoch, batch_size=cfg.batch_size,
                                             world_size=world, num_batches=cfg.num_batches, subset=ids)
    plan = make_plan(subset)
    metrics = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"], "time_plan": time.perf_counter() - started}
    if epoch >= cfg.warmup_epochs and method.uses_tables and start_step == 0 and refresh_due(cfg, epoch, tables):
        metrics.update(refresh_tables(cfg, epoch, model, data, plan, tables, accelerator))
        t0 = time.perf_counter()
        check_tables_identical(tables)
        metrics.update(tables_checked_ranks=world, time_check=time.perf_counter() - t0)
    elif memorisation_due(cfg, epoch):
        metrics.update(memorisation_pass(cfg, model, data, plan, accelerator))
    epoch_ids = plan.unique_ids  # the metrics below cover the whole epoch, whatever part of it trains
    keep = method.train_ids(epoch_ids, tables) if epoch >= cfg.warmup_epochs else None
    if keep is not None:  # the method trains on part of the epoch's ids (selection baselines)
        metrics["train_fraction"] = len(keep) / max(len(epoch_ids), 1)
        plan = make_plan(keep)
    method = epoch_method(cfg, epoch, method)
    plan, dataset = warmup_plan(cfg, epoch, plan, data)
    seed = (cfg.seed * 1_000_003 + epoch) * 1009 + rank
    t0 = time.perf_counter()
    batches = train_batches(cfg, epoch, plan, method, tables, rank)[start_step:]
    metrics["time_partners"] = time.perf_counter() - t0
    loader = id_loader(dataset, batches, cfg.workers, seed, first_step=start_step)
    step_loss = method_loss(method, tables, seed, model, prior=cfg.prior_penalty and epoch >= cfg.warmup_epochs)
    stats = train_one_epoch(model, optimizer, step_loss, loader, accelerator, data.input_shape,
                            progress=cfg.progress and accelerator.is_local_main_process, stop=stop,
                            start_step=start_step)
    if getattr(method, "step_momentum", None) is not None:  # target_update: step (also when preempted mid-epoch)
        metrics["targets_moved_in_steps"] = apply_step_updates(tables, method.step_updates, method.step_momentum)
    metrics.update(pass_totals(stats))
    t0 = time.perf_counter()
    metrics.update(table_metrics(data.train, tables, epoch_ids))
    metrics.update(method.epoch_metrics(data.train.true_labels))
    metrics["time_metrics"] = time.perf_counter() - t0
    metrics["epoch_seconds"] = time.perf_counter() - started  # everything but evaluation and checkpoint
    return metrics


def evaluate_splits(cfg: Config, epoch: int, model, data: Data, accelerator) -> dict:
    """Top-1/top-5 of every eval split (every `eval_every` epochs and at the last epoch)."""
    if (epoch + 1) % cfg.eval_every and epoch + 1 != cfg.epochs:
        return {}
    out = {}
    for name, ds in data.evals.items():
        result = evaluate(model, ds, accelerator, eval_batch_size(cfg, accelerator),
                          cfg.workers)
        out.update({f"{name}_top1": result["top1"], f"{name}_top5": result["top5"],
                    f"{name}_skipped": result["skipped"]})
    return out


def update_best(best: dict, metrics: dict, select: str) -> tuple[dict, bool]:
    """Model selection on `select`'s top-1 only (never on test unless told); the record keeps every
    split's accuracy at that epoch, e.g. Clothing1M's test accuracy of the best-val model."""
    key = f"{select}_top1"
    if key not in metrics or metrics[key] <= best["metric"]:
        return best, False
    return {"metric": metrics[key], "epoch": metrics["epoch"], "split": select,
            **{k: v for k, v in metrics.items() if k.endswith(("_top1", "_top5"))}}, True
