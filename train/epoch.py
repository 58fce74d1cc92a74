"""One epoch of Algorithm 1 for every method: plan, the method's refresh of the tables, its training pass,
the epoch's metrics; then evaluation and model selection."""
from __future__ import annotations

import resource
import time
from typing import TYPE_CHECKING

import numpy as np

from data.reader import id_loader
from index.comm import all_gather_rows

from .dataset import Data
from .loop import eval_batch_size, evaluate, train_one_epoch
from .methods import EpochContext, Method
from .results import EpochResult
from .tables import table_metrics

if TYPE_CHECKING:  # Config is built on first use (train.config.config_class)
    from .config import Config


def pass_totals(stats: dict, reads: np.ndarray) -> tuple[dict, dict]:
    """A training pass's statistics over the ranks, summed (images, skips) or maxed (RSS), and the epoch's
    reads of training images (every pass counted: refresh, training, memorisation): JPEG decodes, cache
    reads, and decodes per trained image. One gather of one row per rank."""
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    row = [stats["train_images"], stats["skipped_train"], peak_mb, int(reads[0]), int(reads[1])]
    totals = np.concatenate(all_gather_rows(np.array([row], np.int64)))
    images, skipped, _, decoded, cached = (int(v) for v in totals.sum(0))
    train = {**stats, "images_per_second": float(images / max(stats["train_seconds"], 1e-9)),
             "skipped_train": skipped, "peak_rss_mb_per_rank": int(totals[:, 2].max())}
    return train, {"images_decoded": decoded, "images_from_cache": cached,
                   "decodes_per_trained_image": decoded / images if images else None}


def run_epoch(ctx: EpochContext, method: Method, optimizer, stop=None, subset=None) -> EpochResult:
    """One epoch of Algorithm 1: the plan, `method.refresh` (the per-sample tables), the training pass of
    `method.steps`, the tables' and the method's metrics. A run resumed mid-epoch (`ctx.start_step > 0`)
    keeps the tables of its checkpoint and skips the steps already done. `subset`: the ids the epoch plans
    over (a cross-validation fold's training part)."""
    started = time.perf_counter()
    cfg = ctx.cfg
    ctx.plan = ctx.plan_of(subset)
    if ctx.data.train.epoch_cache is not None:  # slots for the epoch's ids (the same on every rank)
        ctx.data.train.epoch_cache.assign(ctx.plan.unique_ids, len(ctx.data.train))
    result = EpochResult({"epoch": ctx.epoch}).add({"lr": optimizer.param_groups[0]["lr"]}, "train")
    result.add({"time_plan": time.perf_counter() - started}, "time")
    result.merge(method.refresh(ctx))
    steps = method.steps(ctx)
    result.merge(steps.result)
    loader = id_loader(steps.dataset, steps.batches[ctx.start_step:], cfg.workers, ctx.seed,
                       first_step=ctx.start_step)
    stats = train_one_epoch(ctx, optimizer, steps.step_loss, loader, stop=stop)
    if steps.finish is not None:  # e.g. soft targets moved in the steps (also when preempted mid-epoch)
        result.add(steps.finish(), "labels")
    result.stopped_at = stats.pop("stopped_at")
    result.unreadable_ids = np.unique(np.concatenate(all_gather_rows(stats.pop("unreadable_ids"))))
    result.reads = result.reads + stats.pop("reads")
    totals, read = pass_totals(stats, result.reads)
    result.add(totals, "train").groups.update({k: "time" for k in totals if k.endswith("_seconds")})  # its durations
    result.add(read, "data")
    t0 = time.perf_counter()
    result.merge(table_metrics(ctx.data.train, ctx.tables, ctx.plan.unique_ids))  # the whole epoch's ids
    result.add(steps.method.epoch_metrics(ctx.data.train.true_labels), steps.method.name)
    result.add({"time_metrics": time.perf_counter() - t0,
                "epoch_seconds": time.perf_counter() - started}, "time")  # everything but evaluation and checkpoint
    return result


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
