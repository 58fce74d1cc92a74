"""Entry point: `accelerate launch train/main.py [--config launch/configs/X.yaml] [--key value ...]`.

With no arguments: MixNN on the built-in digits set with 40% symmetric noise (prepared on first use).
The loop is Algorithm 1 for every method; each epoch (train.epoch.run_epoch) plans its ids, refreshes the
per-sample tables (train.tables), trains one pass and evaluates.
"""
from __future__ import annotations

import dataclasses
import logging
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script by `accelerate launch train/main.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "train"

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger

from .checkpoint import checkpoint_state, find_checkpoint, load_checkpoint, restore, save_checkpoint
from .config import Config, load_config, save_config
from .crossval import out_of_sample_probabilities
from .dataset import Data, load_data
from .epoch import evaluate_splits, run_epoch, update_best
from .methods import SelectMix, Tables, create_method
from .models import create_model
from .optim import create_optimizer
from .preempt import StopFlag
from .report import write_report
from .runlog import RunLog, final_summary, format_epoch
from .targets import SoftTargets

logger = get_logger(__name__)


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


def create_run_method(cfg: Config, data: Data, accelerator, run_dir: Path, num_classes: int):
    """The method object; SelectMix first runs (or reloads) its cross-validation stage."""
    if cfg.method != "selectmix":
        return create_method(cfg)
    oos = out_of_sample_probabilities(cfg, data, accelerator, run_dir, num_classes)
    return SelectMix(oos, data.train.labels, threshold=cfg.selectmix_threshold, confident=cfg.selectmix_confident,
                     alpha=cfg.mixup_alpha, rule=cfg.selectmix_rule)


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


def preempted(cfg, run_dir, epoch, step, model, optimizer, scheduler, tables, best, accelerator, stop) -> None:
    """Write the mid-epoch checkpoint (`last.pt`) and leave; the batch script requeues the job."""
    state = checkpoint_state(cfg, epoch, model, optimizer, scheduler, tables, best, accelerator, step=step)
    if accelerator.is_main_process:
        save_checkpoint(run_dir, state, epoch, keep=cfg.keep_checkpoints, is_best=False)
        print(f"preempted by {stop.signal_name or 'a signal on another rank'}: checkpoint at epoch {epoch} "
              f"step {step} in {run_dir / 'last.pt'}; resume with --resume {run_dir}", flush=True)
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
