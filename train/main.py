"""Entry point: `accelerate launch train/main.py [--config launch/configs/X.yaml] [--key value ...]`.

With no arguments: MixNN on the built-in digits set with 40% symmetric noise (prepared on first use).
The loop is Algorithm 1 for every method (train.methods.METHODS); each epoch (train.epoch.run_epoch) plans its
ids, lets the method refresh the per-sample tables and lay out its training pass, trains it and evaluates.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if __package__ in (None, ""):  # run as a script by `accelerate launch train/main.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "train"

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.logging import get_logger

from data.atomic import WriteFailed

from .checkpoint import checkpoint_state, load_resume_checkpoint, method_entry, restore, save_checkpoint
from .config import HelpRequested, UserError, help_text, load_config, save_config
from .crossval import StageStopped, out_of_sample_probabilities
from .dataset import Data, load_data
from .epoch import evaluate_splits, run_epoch, update_best
from .loop import Diverged
from .methods import EpochContext, Method, Tables, create_method, create_run_model, method_class
from .methods.base import warmup_order_warning
from .optim import create_optimizer
from .results import EpochResult
from .preempt import StopFlag
from .report import write_report
from .runfolder import claim_run_dir, finished_summary
from .runlog import RunLog, final_summary, format_epoch
from .targets import SoftTargets

if TYPE_CHECKING:  # Config is built on first use (train.config.config_class)
    from .config import Config

logger = get_logger(__name__)


def create_accelerator(cfg: Config) -> Accelerator:
    """CPU (gloo) without CUDA. bf16 autocast: `auto` on CUDA only; `bf16` on CUDA and on CPU (PyTorch's CPU
    autocast: the same casts a GPU run takes - float32 logits and embeddings, soft CE in float32 - run in CI)."""
    cuda = torch.cuda.is_available()
    precision = "bf16" if cfg.mixed_precision == "bf16" or (cuda and cfg.mixed_precision == "auto") else "no"
    # a method whose step trains part of the model (two networks, one per step): DDP must accept unused parameters
    unused = method_class(cfg.method).find_unused_parameters
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=True)] if unused else []
    return Accelerator(cpu=not cuda, mixed_precision=precision, kwargs_handlers=handlers)


def resolve_run_dir(cfg: Config, accelerator: Accelerator) -> Path:
    """The run folder (the resumed one, or output/<name>), the same on every rank."""
    if cfg.resume:
        return Path(cfg.resume)
    name = [cfg.run_name or f"{cfg.dataset}-{cfg.method}-{time.strftime('%Y%m%d-%H%M%S')}"]
    if accelerator.num_processes > 1:
        torch.distributed.broadcast_object_list(name, src=0)
    return Path(cfg.output) / name[0]


def create_run_method(run: "Run", stop=None) -> Method:
    """The method object (with its checkpoint entry when resuming); a method with `cross_validation` first runs
    (or reloads) the K-fold stage (SelectMix, Confident Learning)."""
    cfg, data, num_classes = run.cfg, run.data, run.data.manifest["num_classes"]
    oos = None
    if method_class(cfg.method).cross_validation:
        oos = out_of_sample_probabilities(cfg, data, run.accelerator, run.run_dir, num_classes, stop)
    method = create_method(cfg, data.train.labels, num_classes, oos)
    if run.method_state is not None:
        method.load_state_dict(run.method_state)
    return method


@dataclass
class Run:
    """Everything a run trains with, built once (and restored from the last checkpoint when resuming)."""

    cfg: Config
    accelerator: Accelerator
    run_dir: Path
    data: Data
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    tables: Tables
    start: int = 0  # epoch to continue at
    step: int = 0  # step of that epoch (mid-epoch checkpoint of a preempted run)
    best: dict = field(default_factory=lambda: {"metric": -1.0, "epoch": -1})
    partial: dict = field(default_factory=dict)  # scalars a preempted epoch logged before it stopped
    last_row: dict = field(default_factory=dict)  # summary.csv row of the checkpoint's epoch
    lock: object = None  # the run folder's lock (main process)
    finished: dict | None = None  # the saved summary of a run that already trained all its epochs
    method: Method | None = None  # built after the run is restored (its stage may need the run folder)
    method_state: dict | None = None  # the method's checkpoint entry, when resuming


def on_main_process(accelerator: Accelerator, fn):
    """`fn()` on the main process; a UserError there is raised on every rank (no rank is left waiting)."""
    result, error = None, [""]
    if accelerator.is_main_process:
        try:
            result = fn()
        except UserError as e:
            error = [str(e)]
    if accelerator.num_processes > 1:
        torch.distributed.broadcast_object_list(error, src=0)
    if error[0]:
        raise UserError(error[0])
    return result


def start_run(cfg: Config) -> Run:
    """Accelerator, run folder (locked), data, model, optimizer and per-sample tables; a resumed run restores
    all of them from its newest good checkpoint."""
    accelerator = create_accelerator(cfg)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    run_dir = resolve_run_dir(cfg, accelerator)
    lock = on_main_process(accelerator, lambda: claim_run_dir(run_dir, bool(cfg.resume)))
    found = load_resume_checkpoint(run_dir) if cfg.resume else None
    if cfg.resume and found is None:
        check_resumable(run_dir)
    if found is not None and (done := finished_summary(run_dir, cfg.epochs, found[1]["epoch"])) is not None:
        return Run(cfg, accelerator, run_dir, None, None, None, None, None, lock=lock, finished=done)
    data = load_data(cfg, accelerator)
    cfg = dataclasses.replace(cfg, data=str(data.root.resolve()))  # the run folder names its data exactly
    if warning := warmup_order_warning(cfg, data.train.labels):
        logger.warning(warning, main_process_only=True)
    torch.manual_seed(cfg.seed)  # same initial weights everywhere; a resumed run restores its RNG below
    num_classes = data.manifest["num_classes"]
    model = create_run_model(cfg, num_classes, data.input_shape[0], pretrained=cfg.pretrained, drop_rate=cfg.drop_rate,
                             pretrained_strict=cfg.pretrained_strict)
    optimizer, scheduler = create_optimizer(cfg, model)
    model, optimizer = accelerator.prepare(model, optimizer)  # loaders stay ours: ids are split by the plan
    run = Run(cfg, accelerator, run_dir, data, model, optimizer, scheduler,
              Tables(SoftTargets(data.train.labels, num_classes, cfg.targets_topk)), lock=lock)
    if found is not None:
        path, state = found
        state, run.method_state = method_entry(state, method_class(cfg.method).legacy_keys)
        run.start, run.step, run.best = restore(state, model, optimizer, scheduler, run.tables, accelerator)
        run.partial = dict(state.get("partial_metrics") or {})
        run.last_row = dict(state.get("summary_row") or {})
        logger.info("resumed %s from %s at epoch %d step %d", run_dir, path.name, run.start, run.step)
    if accelerator.is_main_process:
        save_config(dataclasses.replace(cfg, resume=""), run_dir / "config.yaml")
    return run


def check_resumable(run_dir: Path) -> None:
    """`--resume RUN` needs a checkpoint, or a cross-validation stage under way (its finished folds)."""
    if not any((run_dir / "selectmix").glob("fold-*")):
        raise UserError(f"--resume {run_dir}: no checkpoint there (last.pt is missing); "
                        "name the run folder of an interrupted run, or drop --resume to start a new one")


def train(cfg: Config) -> dict:
    """Algorithm 1: per epoch, refresh the per-sample tables and train one pass (train.epoch.run_epoch),
    evaluate, keep the best checkpoint by `select_split`, log; returns the final summary."""
    started = time.perf_counter()
    run = start_run(cfg)
    if run.finished is not None:
        return already_finished(run)
    cfg, accelerator, tables = run.cfg, run.accelerator, run.tables
    log = RunLog(run.run_dir, accelerator, cfg)
    log.restore_row(run.last_row)  # a kill between the checkpoint and the summary.csv write lost nothing
    stop = StopFlag().install()  # before the cross-validation stage: a signal there is honoured at the first step
    try:
        run.method = create_run_method(run, stop)
    except StageStopped as e:
        return stage_stopped(run, e, stop)
    select = cfg.select_split or (cfg.eval_splits[0] if cfg.eval_splits else "")
    metrics = {}
    for epoch in range(run.start, cfg.epochs):
        ctx = EpochContext(cfg, epoch, run.model, run.data, tables, accelerator,
                           start_step=run.step if epoch == run.start else 0)
        try:
            result = run_epoch(ctx, run.method, run.optimizer, stop)
        except Diverged as e:
            raise diverged(run, epoch, e.step) from None
        if epoch == run.start and run.step:  # the scalars the preempted part of this epoch logged (its refresh)
            result.scalars = {**run.partial, **result.scalars}
        if result.stopped_at is not None:
            return preempted(run, epoch, result, stop)
        result.add(evaluate_splits(cfg, epoch, run.model, run.data, accelerator), "eval")
        if not all(bool(torch.isfinite(p).all()) for p in run.model.parameters()):
            raise diverged(run, epoch, None)
        run.scheduler.step()
        run.best, is_best = update_best(run.best, result.scalars, select)
        t0 = time.perf_counter()
        state = checkpoint_state(run, epoch)
        state["summary_row"] = scalars(result.scalars)
        if accelerator.is_main_process:
            save_checkpoint(run.run_dir, state, epoch, keep=cfg.keep_checkpoints, is_best=is_best)
        result.add({"time_checkpoint": time.perf_counter() - t0}, "time")  # main process: gathering RNG states, writing
        log.write(result, tables, run.data.train)
        metrics = result.scalars
        logger.info(format_epoch(metrics), main_process_only=True)
        accelerator.wait_for_everyone()
    metrics = metrics or log.last_row()  # nothing left to train: the last logged epoch (final.json was lost)
    metrics["train_seconds_total"] = time.perf_counter() - started  # this process's wall time, stage included
    summary = final_summary(cfg, run.run_dir, metrics, run.best, accelerator, log)
    if accelerator.is_main_process and metrics:
        t0 = time.perf_counter()
        write_report(run.run_dir, run.data.train, tables, run.data.manifest["class_names"], log.tensorboard())
        logger.info("label report written in %.1f s", time.perf_counter() - t0)
    accelerator.end_training()
    return summary


def main(argv=None) -> dict:
    """Entry point. A user's mistake or a bad input file prints one `error: ...` line (first rank) and exits 2,
    without a traceback; Ctrl-C checkpoints and exits 130; bugs keep their traceback."""
    try:
        cfg = load_config(sys.argv[1:] if argv is None else argv)
    except HelpRequested:
        print(help_text(), end="")
        return {}
    except UserError as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    try:
        summary = train(cfg)
    except (UserError, WriteFailed) as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {e.strerror if isinstance(e, WriteFailed) else e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    if summary.get("exit_code"):
        raise SystemExit(summary["exit_code"])
    return summary


def cli() -> int:
    """Console entry point `noisymix-train` (one process; `accelerate launch -m train.main` for several)."""
    main()
    return 0


def already_finished(run: Run) -> dict:
    """A resubmitted finished run: nothing is trained or rewritten."""
    if run.accelerator.is_main_process:
        print(f"run {run.run_dir} already finished ({run.finished.get('epochs')} epochs); its results are kept in "
              f"{run.run_dir / 'final.json'} (nothing to do; raise --epochs to train further)", flush=True)
    run.accelerator.end_training()
    return run.finished


def diverged(run: Run, epoch: int, step: int | None) -> UserError:
    """The one-line error of a run whose loss or weights became non-finite; no checkpoint of it is written."""
    where = f"epoch {epoch} step {step}" if step is not None else f"the end of epoch {epoch} (the weights)"
    kept = f"checkpoint of epoch {run.start - 1 if epoch == run.start else epoch - 1}" if epoch else "no checkpoint"
    return UserError(f"training diverged: non-finite values at {where} (lr {run.cfg.lr:g}); nothing of this "
                     f"epoch was saved and the run folder keeps its last good {kept}; lower --lr or "
                     f"check the data, then start again or --resume {run.run_dir}")


def stage_stopped(run: Run, stopped: StageStopped, stop) -> dict:
    """The cross-validation stage stopped at a signal (its fold state is saved): leave as a preempted run does."""
    if run.accelerator.is_main_process:
        print(f"preempted by {stop.signal_name or 'a signal on another rank'} in the cross-validation stage at "
              f"{stopped}; resume with --resume {run.run_dir}", flush=True)
    run.accelerator.end_training()
    return {"preempted": True, "stage": str(stopped), "exit_code": stop.exit_code}


def scalars(metrics: dict) -> dict:
    """The plain numbers of a metrics dict (what a checkpoint can hold under weights_only)."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def preempted(run: Run, epoch: int, result: EpochResult, stop) -> dict:
    """Write the mid-epoch checkpoint (`last.pt`, with the scalars logged so far this epoch) and leave; the
    batch script requeues the job (exit 0), or Ctrl-C exits 130."""
    step = result.stopped_at
    state = checkpoint_state(run, epoch, step=step)
    state["partial_metrics"] = scalars(result.scalars)
    if run.accelerator.is_main_process:
        save_checkpoint(run.run_dir, state, epoch, keep=run.cfg.keep_checkpoints, is_best=False)
        print(f"preempted by {stop.signal_name or 'a signal on another rank'}: checkpoint at epoch {epoch} "
              f"step {step} in {run.run_dir / 'last.pt'}; resume with --resume {run.run_dir}", flush=True)
    run.accelerator.wait_for_everyone()
    run.accelerator.end_training()
    return {"preempted": True, "epoch": epoch, "step": step, "exit_code": stop.exit_code}


if __name__ == "__main__":
    main()
