"""The run log: summary.csv (one row per epoch), TensorBoard through Accelerate's tracker, the final summary."""
from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

from accelerate import Accelerator
from accelerate.tracking import TensorBoardTracker

from data.reader import ShardDataset

from .config import Config
from .methods import Tables


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


def format_epoch(m: dict) -> str:
    keys = ("train_loss", "lr", "test_top1", "val_top1", "label_correction_accuracy", "noise_precision",
            "noise_recall", "clean_fraction", "train_seconds")
    return f"epoch {m['epoch']}: " + " ".join(f"{k}={m[k]:.4g}" for k in keys if k in m)


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
