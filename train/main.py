"""Entry point: `accelerate launch train/main.py [--config launch/configs/X.yaml] [--key value ...]`.

With no arguments: MixNN on the built-in digits set with 40% symmetric noise (prepared on first use).
"""
from __future__ import annotations

import csv
import dataclasses
import json
import logging
import resource
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script by `accelerate launch train/main.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "train"

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.tracking import TensorBoardTracker

from data.plan import build_epoch_plan, epoch_rng
from data.reader import ShardDataset, id_loader
from data.shards import read_manifest
from data.transforms import EvalTransform, TrainTransform, get_preset
from index.comm import all_gather_rows, gather_by_id

from .checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from .config import Config, load_config, save_config
from .loop import (evaluate, fit_clean, neighbour_table, per_sample_loss, refresh, train_one_epoch,
                   update_targets, windowed_losses)
from .methods import CrossEntropy, Tables, create_method
from .metrics import label_correction_accuracy, neighbour_agreement, noise_detection
from .models import create_model
from .preempt import StopFlag
from .report import write_report
from .selectmix import SelectMix, fold_file, load_folds, save_fold, stratified_folds, uncertainty_metrics
from .targets import SoftTargets

logger = get_logger(__name__)


@dataclass
class Data:
    """The prepared data set: manifest, training split (augmenting and plain views), eval splits."""

    root: Path
    manifest: dict
    train: ShardDataset  # train transform
    train_plain: ShardDataset  # eval transform, for the refresh pass
    evals: dict  # split name -> ShardDataset
    input_shape: tuple


def create_accelerator(cfg: Config) -> Accelerator:
    """CPU (gloo) without CUDA; bf16 autocast on CUDA when mixed_precision is auto or bf16."""
    cuda = torch.cuda.is_available()
    precision = "bf16" if cuda and cfg.mixed_precision in ("auto", "bf16") else "no"
    return Accelerator(cpu=not cuda, mixed_precision=precision)


def resolve_run_dir(cfg: Config, accelerator: Accelerator) -> Path:
    """The run folder (the resumed one, or output/<name>), the same on every rank."""
    if cfg.resume:
        return Path(cfg.resume)
    name = [cfg.run_name or f"{cfg.dataset}-{cfg.method}-{time.strftime('%Y%m%d-%H%M%S')}"]
    if accelerator.num_processes > 1:
        torch.distributed.broadcast_object_list(name, src=0)
    return Path(cfg.output) / name[0]


def data_root(cfg: Config) -> Path:
    return Path(cfg.data or f"shards/{cfg.dataset}-{cfg.noise.replace(':', '')}-s{cfg.noise_seed}")


def ensure_prepared(cfg: Config, accelerator: Accelerator) -> Path:
    """Prepare the built-in digits set on first use (main process; the others wait)."""
    root = data_root(cfg)
    if accelerator.is_main_process and not (root / "dataset.json").is_file():
        if cfg.dataset != "digits":
            raise FileNotFoundError(f"{root}/dataset.json not found: prepare the data with "
                                    f"`python -m data.prepare {cfg.dataset} --root RAW --out {root}`")
        from data.prepare import build_parser, prepare

        logger.info("preparing digits with %s noise into %s", cfg.noise, root)
        prepare(build_parser().parse_args(["digits", "--out", str(root), "--noise", cfg.noise,
                                           "--seed", str(cfg.noise_seed)]))
    accelerator.wait_for_everyone()
    return root


def load_data(cfg: Config, accelerator: Accelerator) -> Data:
    root = ensure_prepared(cfg, accelerator)
    manifest = read_manifest(root)
    preset = get_preset(cfg.dataset, cfg.image_size or None)
    train = ShardDataset(root / cfg.train_split, TrainTransform(preset=preset), preset.mode)
    evals = {s: ShardDataset(root / s, EvalTransform(preset=preset), preset.mode) for s in cfg.eval_splits}
    cache_images(cfg, [train, *evals.values()])
    plain = train.with_transform(EvalTransform(preset=preset))  # shares the cache
    return Data(root, manifest, train, plain, evals, (1 if preset.mode == "L" else 3, preset.size, preset.size))


def cache_images(cfg: Config, datasets: list[ShardDataset]) -> None:
    """Decode small splits into memory once (`cache_images`), in order, within `cache_max_mb` per process."""
    if cfg.cache_images == "false":
        return
    budget = (cfg.cache_max_mb << 20) if cfg.cache_images == "auto" else 1 << 62
    for ds in datasets:
        if ds.cache_decoded(budget):
            budget -= ds.cache_bytes
        else:
            logger.info("%s: not cached (decoded images would exceed cache_max_mb=%d)", ds.split_dir,
                        cfg.cache_max_mb)


def eval_batch_size(cfg: Config, accelerator) -> int:
    """Per-rank batch of the forward-only passes (refresh, evaluation): twice the training share."""
    return max(cfg.batch_size // accelerator.num_processes, 1) * 2


def create_optimizer(cfg: Config, model):
    """SGD with momentum and cosine annealing with warm restarts (stepped per epoch)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(optimizer, T_0=cfg.restart_period,
                                                                     eta_min=cfg.lr_min)
    return optimizer, scheduler


def refresh_tables(cfg: Config, epoch: int, model, data: Data, plan, tables: Tables, accelerator) -> dict:
    """Refresh pass -> GMM clean probabilities -> soft targets (epoch >= E_s) -> neighbour table."""
    t0 = time.perf_counter()
    rank = accelerator.process_index
    stats = refresh(accelerator.unwrap_model(model), data.train_plain, plan.refresh_slice(rank), accelerator,
                    eval_batch_size(cfg, accelerator), cfg.workers,
                    progress=cfg.progress and accelerator.is_local_main_process)
    t1 = time.perf_counter()
    labels = (tables.targets.corrected() if cfg.gmm_loss == "corrected" else data.train.labels)[stats.ids]
    losses = gather_by_id(stats.ids, per_sample_loss(stats.probs, labels).astype(np.float32), len(data.train))
    tables.loss_history, losses = windowed_losses(tables.loss_history, losses, cfg.gmm_loss_window)
    clean, fit = fit_clean(losses, cfg.seed + epoch, accelerator.is_main_process)
    tables.clean = clean
    t2 = time.perf_counter()
    if 0 <= cfg.correction_epoch <= epoch:
        update_targets(tables, stats, cfg.ema)
    t3 = time.perf_counter()
    if cfg.knn_scope == "global":
        tables.partners, recall = neighbour_table(stats, len(data.train), cfg)
    else:
        tables.partners, recall = None, None  # in-batch neighbours are found at each step
    t4 = time.perf_counter()
    out = {"time_refresh": t1 - t0, "time_gmm": t2 - t1, "time_targets": t3 - t2, "time_knn": t4 - t3,
           "clean_fraction": float((clean[plan.unique_ids] > 0.5).mean()),
           "neighbour_agreement": (neighbour_agreement(tables.partners, data.train.labels, plan.unique_ids)
                                   if tables.partners is not None else None)}
    if recall is not None:
        out[f"knn_recall_at_{cfg.k}"] = recall
    if fit is not None:
        out.update(gmm_mean_clean=fit.means[0], gmm_mean_noisy=fit.means[1], gmm_weight_clean=fit.weights[0])
    return out


def refresh_due(cfg: Config, epoch: int, tables: Tables) -> bool:
    """For an epoch after warm-up: every `refresh_every` epochs, and whenever the tables were never refreshed."""
    return tables.clean is None or (epoch - cfg.warmup_epochs) % cfg.refresh_every == 0


def check_tables_identical(tables: Tables) -> None:
    """Every rank must hold the same per-sample tables; a CRC of each is compared across ranks."""
    parts = [tables.targets.values.numpy().tobytes(), b"" if tables.clean is None else tables.clean.tobytes(),
             b"" if tables.partners is None else tables.partners.tobytes()]
    digest = np.array([[zlib.crc32(p) for p in parts]], dtype=np.int64)
    everyone = np.concatenate(all_gather_rows(digest))
    if (everyone != everyone[0]).any():
        raise RuntimeError(f"per-sample tables differ between ranks (CRCs {everyone.tolist()})")


def train_batches(cfg, epoch, plan, method, tables, rank) -> list[np.ndarray]:
    """Per step: this rank's anchor ids followed by their partners' ids (read together, prefetched)."""
    rng = epoch_rng(cfg.seed, epoch, stream=2 + rank)
    out = []
    for anchors in plan.batches(rank):
        partners = method.partner_ids(anchors, tables, plan.unique_ids, rng)
        out.append(np.concatenate([anchors, partners.T.reshape(-1)]))
    return out


def run_epoch(cfg: Config, epoch: int, model, optimizer, method, data: Data, tables: Tables, accelerator,
              stop=None, start_step: int = 0, subset=None) -> dict:
    """One epoch of Algorithm 1 (warm-up epochs: plain cross-entropy, no refresh). A run resumed
    mid-epoch (`start_step > 0`) keeps the tables of its checkpoint and skips the steps already done."""
    started = time.perf_counter()
    rank, world = accelerator.process_index, accelerator.num_processes
    plan = build_epoch_plan(data.train.labels, seed=cfg.seed, epoch=epoch, batch_size=cfg.batch_size,
                            world_size=world, num_batches=cfg.num_batches, subset=subset)
    metrics = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"]}
    if epoch < cfg.warmup_epochs:
        method = CrossEntropy()
    elif method.name == "mixnn" and start_step == 0 and refresh_due(cfg, epoch, tables):
        metrics.update(refresh_tables(cfg, epoch, model, data, plan, tables, accelerator))
        check_tables_identical(tables)
        metrics["tables_checked_ranks"] = world
    seed = (cfg.seed * 1_000_003 + epoch) * 1009 + rank
    batches = train_batches(cfg, epoch, plan, method, tables, rank)[start_step:]
    loader = id_loader(data.train, batches, cfg.workers, seed + start_step)
    stats = train_one_epoch(model, optimizer, method, loader, tables, accelerator, seed, data.input_shape,
                            progress=cfg.progress and accelerator.is_local_main_process, stop=stop,
                            start_step=start_step)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    totals = np.concatenate(all_gather_rows(np.array([[stats["train_images"], stats["skipped_train"], peak_mb]])))
    metrics.update(stats, images_per_second=float(totals[:, 0].sum() / max(stats["train_seconds"], 1e-9)),
                   skipped_train=int(totals[:, 1].sum()), peak_rss_mb_per_rank=int(totals[:, 2].max()))
    metrics.update(table_metrics(data.train, tables, plan.unique_ids))
    if isinstance(method, SelectMix):
        metrics.update(uncertainty_metrics(method, data.train.true_labels))
    metrics["epoch_seconds"] = time.perf_counter() - started  # everything but evaluation and checkpoint
    return metrics


def selectmix_stage(cfg: Config, data: Data, accelerator, run_dir: Path, num_classes: int) -> np.ndarray:
    """SelectMix stage 1: out-of-sample softmax [N, C] from K fold models (finished folds are kept)."""
    labels, n = data.train.labels, len(data.train)
    folds = stratified_folds(labels, cfg.cv_folds, cfg.seed)
    fold_cfg = dataclasses.replace(cfg, warmup_epochs=cfg.cv_epochs, restart_period=cfg.cv_epochs)
    for fold in range(cfg.cv_folds):
        if fold_file(run_dir, fold).is_file():
            continue
        torch.manual_seed(cfg.seed * 1000 + fold)
        model = create_model(cfg.model, num_classes, data.input_shape[0], pretrained=cfg.pretrained,
                             drop_rate=cfg.drop_rate, channels_last=cfg.channels_last)
        optimizer, scheduler = create_optimizer(fold_cfg, model)
        model, optimizer = accelerator.prepare(model, optimizer)
        tables = Tables(SoftTargets(labels, num_classes))
        for epoch in range(cfg.cv_epochs):
            run_epoch(fold_cfg, epoch, model, optimizer, CrossEntropy(), data, tables, accelerator,
                      subset=np.flatnonzero(folds != fold))
            scheduler.step()
        held = np.flatnonzero(folds == fold)
        stats = refresh(accelerator.unwrap_model(model), data.train_plain,
                        np.array_split(held, accelerator.num_processes)[accelerator.process_index], accelerator,
                        eval_batch_size(cfg, accelerator), cfg.workers)
        probs = gather_by_id(stats.ids, stats.probs, n)
        if accelerator.is_main_process:
            save_fold(run_dir, fold, held, probs[held])
        logger.info("SelectMix fold %d/%d: out-of-sample accuracy vs given labels %.3f", fold + 1, cfg.cv_folds,
                    float((probs[held].argmax(1) == labels[held]).mean()), main_process_only=True)
        accelerator.wait_for_everyone()
    return load_folds(run_dir, cfg.cv_folds, n, num_classes)


def create_run_method(cfg: Config, data: Data, accelerator, run_dir: Path, num_classes: int):
    """The method object; SelectMix first runs (or reloads) its cross-validation stage."""
    if cfg.method != "selectmix":
        return create_method(cfg)
    oos = selectmix_stage(cfg, data, accelerator, run_dir, num_classes)
    return SelectMix(oos, data.train.labels, threshold=cfg.selectmix_threshold, confident=cfg.selectmix_confident,
                     alpha=cfg.mixup_alpha, rule=cfg.selectmix_rule)


def table_metrics(train: ShardDataset, tables: Tables, ids: np.ndarray) -> dict:
    """Label-correction accuracy and noise detection, when true labels are known."""
    out = {}
    acc = label_correction_accuracy(tables.targets.corrected(), train.true_labels, np.arange(len(train)))
    if acc is not None:
        out["label_correction_accuracy"] = acc
    if tables.clean is not None:
        out.update(noise_detection(tables.clean, train.labels, train.true_labels, ids))
    return out


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


def checkpoint_state(cfg, epoch, model, optimizer, scheduler, tables, best, accelerator, step=None) -> dict:
    """Everything a resumed run needs; every rank's RNG state is gathered into the one file.
    `epoch`/`step` name where to continue: step 0 of the next epoch, or mid-epoch after a preemption."""
    rng = all_gather_rows(torch.get_rng_state().numpy()[None])
    return {"model": accelerator.unwrap_model(model).state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "epoch": epoch + 1 if step is None else epoch,
            "step": step or 0, "targets": tables.targets.state_dict(),
            "clean": None if tables.clean is None else torch.from_numpy(tables.clean),
            "partners": None if tables.partners is None else torch.from_numpy(tables.partners),
            "loss_history": None if tables.loss_history is None else torch.from_numpy(tables.loss_history),
            "rng": [torch.from_numpy(r[0]) for r in rng], "best": best, "config": dataclasses.asdict(cfg)}


def restore(state: dict, model, optimizer, scheduler, tables: Tables, accelerator) -> tuple[int, int, dict]:
    """Load a checkpoint into the live objects; returns (epoch, step to continue at, best record)."""
    accelerator.unwrap_model(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    tables.targets.load_state_dict(state["targets"])
    tables.clean = None if state["clean"] is None else state["clean"].numpy()
    tables.partners = None if state["partners"] is None else state["partners"].numpy()
    history = state.get("loss_history")
    tables.loss_history = None if history is None else history.numpy()
    if len(state["rng"]) == accelerator.num_processes:
        torch.set_rng_state(state["rng"][accelerator.process_index])
    return state["epoch"], state.get("step", 0), state["best"]


class RunLog:
    """summary.csv (one row per epoch, main process) + TensorBoard through Accelerate's tracker."""

    def __init__(self, run_dir: Path, accelerator: Accelerator, cfg: Config):
        self.path, self.accelerator = run_dir / "summary.csv", accelerator
        if accelerator.is_main_process:
            accelerator.log_with = [TensorBoardTracker("tb", str(run_dir))]
        accelerator.init_trackers("tb", config={k: str(v) for k, v in dataclasses.asdict(cfg).items()})

    def write(self, metrics: dict, tables: Tables, train: ShardDataset) -> None:
        self.accelerator.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=metrics["epoch"])
        if not self.accelerator.is_main_process:
            return
        self.histograms(metrics["epoch"], tables, train)
        rows = list(csv.DictReader(self.path.open())) if self.path.is_file() else []
        rows = [r for r in rows if int(r["epoch"]) < metrics["epoch"]] + [metrics]  # resumed: drop redone epochs
        fields = list(dict.fromkeys(k for r in rows for k in r))
        with self.path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)

    def tensorboard(self):
        """The SummaryWriter (main process), for figures."""
        return self.accelerator.get_tracker("tensorboard", unwrap=True)

    def histograms(self, epoch: int, tables: Tables, train: ShardDataset) -> None:
        if tables.clean is None:
            return
        writer = self.tensorboard()
        writer.add_histogram("clean_probability/all", tables.clean, epoch)
        known = train.true_labels >= 0
        for name, mask in (("truly_clean", known & (train.labels == train.true_labels)),
                           ("truly_noisy", known & (train.labels != train.true_labels))):
            if mask.any():
                writer.add_histogram(f"clean_probability/{name}", tables.clean[mask], epoch)


def main(argv=None) -> dict:
    """Train; returns (and prints, on the main process) the final summary."""
    cfg = load_config(sys.argv[1:] if argv is None else argv)
    accelerator = create_accelerator(cfg)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    run_dir = resolve_run_dir(cfg, accelerator)
    data = load_data(cfg, accelerator)
    cfg = dataclasses.replace(cfg, data=str(data.root.resolve()))  # the run folder names its data exactly
    torch.manual_seed(cfg.seed)  # same initial weights everywhere; a resumed run restores its RNG below
    num_classes = data.manifest["num_classes"]
    model = create_model(cfg.model, num_classes, data.input_shape[0], pretrained=cfg.pretrained,
                         drop_rate=cfg.drop_rate, channels_last=cfg.channels_last)
    optimizer, scheduler = create_optimizer(cfg, model)
    model, optimizer = accelerator.prepare(model, optimizer)  # loaders stay ours: ids are split by the plan
    tables = Tables(SoftTargets(data.train.labels, num_classes, cfg.targets_topk))
    start, step, best = 0, 0, {"metric": -1.0, "epoch": -1}
    if cfg.resume and find_checkpoint(run_dir).is_file():
        start, step, best = restore(load_checkpoint(find_checkpoint(run_dir)), model, optimizer, scheduler, tables,
                              accelerator)
        logger.info("resumed %s at epoch %d step %d", run_dir, start, step)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(dataclasses.replace(cfg, resume=""), run_dir / "config.yaml")
    log = RunLog(run_dir, accelerator, cfg)
    stop = StopFlag().install()  # before SelectMix's stage: a signal there is honoured at the first step
    method = create_run_method(cfg, data, accelerator, run_dir, num_classes)
    select = cfg.select_split or (cfg.eval_splits[0] if cfg.eval_splits else "")
    metrics, skipped = {}, 0
    for epoch in range(start, cfg.epochs):
        metrics = run_epoch(cfg, epoch, model, optimizer, method, data, tables, accelerator, stop,
                            step if epoch == start else 0)
        if metrics["stopped_at"] is not None:
            preempted(cfg, run_dir, epoch, metrics["stopped_at"], model, optimizer, scheduler, tables, best,
                      accelerator, stop)
            return {"preempted": True, "epoch": epoch, "step": metrics["stopped_at"]}
        metrics.update(evaluate_splits(cfg, epoch, model, data, accelerator))
        scheduler.step()
        best, is_best = update_best(best, metrics, select)
        skipped += metrics["skipped_train"]
        state = checkpoint_state(cfg, epoch, model, optimizer, scheduler, tables, best, accelerator)
        if accelerator.is_main_process:
            save_checkpoint(run_dir, state, epoch, keep=cfg.keep_checkpoints, is_best=is_best)
        log.write(metrics, tables, data.train)
        logger.info(format_epoch(metrics), main_process_only=True)
        accelerator.wait_for_everyone()
    summary = final_summary(cfg, run_dir, metrics, best, accelerator, skipped)
    if accelerator.is_main_process and metrics:
        write_report(run_dir, data.train, tables, data.manifest["class_names"], log.tensorboard())
    accelerator.end_training()
    return summary


def format_epoch(m: dict) -> str:
    keys = ("train_loss", "lr", "test_top1", "val_top1", "label_correction_accuracy", "noise_precision",
            "noise_recall", "clean_fraction", "train_seconds")
    return f"epoch {m['epoch']}: " + " ".join(f"{k}={m[k]:.4g}" for k in keys if k in m)


def preempted(cfg, run_dir, epoch, step, model, optimizer, scheduler, tables, best, accelerator, stop) -> None:
    """Write the mid-epoch checkpoint (`last.pt`) and leave; the batch script requeues the job."""
    state = checkpoint_state(cfg, epoch, model, optimizer, scheduler, tables, best, accelerator, step=step)
    if accelerator.is_main_process:
        save_checkpoint(run_dir, state, epoch, keep=cfg.keep_checkpoints, is_best=False)
        print(f"preempted by {stop.signal_name or 'a signal on another rank'}: checkpoint at epoch {epoch} "
              f"step {step} in {run_dir / 'last.pt'}; resume with --resume {run_dir}", flush=True)
    accelerator.wait_for_everyone()
    accelerator.end_training()


def update_best(best: dict, metrics: dict, select: str) -> tuple[dict, bool]:
    """Model selection on `select`'s top-1 only (never on test unless told); the record keeps every
    split's accuracy at that epoch, e.g. Clothing1M's test accuracy of the best-val model."""
    key = f"{select}_top1"
    if key not in metrics or metrics[key] <= best["metric"]:
        return best, False
    return {"metric": metrics[key], "epoch": metrics["epoch"], "split": select,
            **{k: v for k, v in metrics.items() if k.endswith(("_top1", "_top5"))}}, True


def final_summary(cfg: Config, run_dir: Path, metrics: dict, best: dict, accelerator, skipped: int) -> dict:
    """final.json in the run folder and a short table on stdout (main process)."""
    keys = [k for k in metrics if k.endswith(("_top1", "_top5")) or k.startswith(("label_correction", "noise_"))]
    summary = {"run_dir": str(run_dir), "epochs": cfg.epochs, "world_size": accelerator.num_processes,
               "last": {k: metrics[k] for k in keys}, "best": best, "skipped_train_samples": skipped}
    if accelerator.is_main_process:
        (run_dir / "final.json").write_text(json.dumps(summary, indent=1) + "\n")
        print(f"\nrun {run_dir} finished ({cfg.method}, {cfg.epochs} epochs)")
        for k in keys:
            print(f"  {k:28s} {metrics[k]:.4f}")
        if skipped:
            print(f"  {skipped} unreadable training samples were skipped (see skipped_train in summary.csv)")
        if best["epoch"] >= 0:
            print(f"  best epoch {best['epoch']} by {cfg.select_split or cfg.eval_splits[0]}: {best['metric']:.2f}")
    return summary


if __name__ == "__main__":
    main()
