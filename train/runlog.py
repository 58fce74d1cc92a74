"""The run log: summary.csv (one row per epoch), TensorBoard through Accelerate's tracker, the final summary."""
from __future__ import annotations

import csv
import dataclasses
import io
import json
from pathlib import Path
from typing import TYPE_CHECKING

from accelerate import Accelerator
from accelerate.tracking import TensorBoardTracker

from data.atomic import atomic_write_text
from data.reader import ShardDataset

from .results import EpochResult
from .targets import Tables

if TYPE_CHECKING:  # Config is built on first use (train.config.config_class)
    from .config import Config


def tag(key: str, groups: dict) -> str:
    """`group/key` for TensorBoard (which groups a tag by the part before its first '/'): the group the scalar's
    producer declared (train.results.EpochResult.add)."""
    return f"{groups.get(key, 'other')}/{key}"


class RunLog:
    """summary.csv (one row per epoch, main process), TensorBoard through Accelerate's tracker, and the
    distinct unreadable training samples (`unreadable_train.csv`: id, source key, first error)."""

    def __init__(self, run_dir: Path, accelerator: Accelerator, cfg: Config):
        self.path, self.accelerator = run_dir / "summary.csv", accelerator
        self.unreadable_path = run_dir / "unreadable_train.csv"
        self.unreadable = {}  # sample id -> (source key, first error); kept across a resume in the run folder
        if self.unreadable_path.is_file():
            self.unreadable = {int(r["id"]): (r["source"], r["error"]) for r in csv.DictReader(self.unreadable_path.open())}
        self.rows = list(csv.DictReader(self.path.open())) if self.path.is_file() else []  # earlier epochs' rows
        if accelerator.is_main_process:
            accelerator.log_with = [TensorBoardTracker("tb", str(run_dir))]
        accelerator.init_trackers("tb", config={k: str(v) for k, v in dataclasses.asdict(cfg).items()})

    def write(self, result: EpochResult, tables: Tables, train: ShardDataset) -> None:
        """Log one epoch: its scalars (summary.csv, TensorBoard under their groups), its figures, and its
        unreadable training ids joined to the list."""
        metrics = result.scalars
        new = [int(i) for i in result.unreadable_ids if int(i) not in self.unreadable]
        for i in new:
            self.unreadable[i] = (str(train.sources[i]), train.read_error(i))
        result.add({"unreadable_train_samples": len(self.unreadable)}, "train")
        self.accelerator.log({tag(k, result.groups): v for k, v in metrics.items()
                              if isinstance(v, (int, float)) and k != "epoch"}, step=metrics["epoch"])
        if not self.accelerator.is_main_process:
            return
        if new:
            self.write_unreadable()
        for name, draw in result.figures.items():
            self.tensorboard().add_figure(name, draw(metrics["epoch"]), metrics["epoch"])
        self.histograms(metrics["epoch"], tables, train)
        self.rows = [r for r in self.rows if int(float(r["epoch"])) < metrics["epoch"]] + [metrics]  # resumed: redone
        self.write_rows()

    def restore_row(self, row: dict) -> None:
        """Put back the row of the epoch a checkpoint holds when summary.csv lacks it (main process)."""
        if not row or not self.accelerator.is_main_process:
            return
        if any(int(float(r["epoch"])) == int(row["epoch"]) for r in self.rows):
            return
        self.rows = [r for r in self.rows if int(float(r["epoch"])) < int(row["epoch"])] + [row]
        self.write_rows()

    def write_rows(self) -> None:
        """summary.csv rewritten whole and replaced atomically: a kill or a full disk at any moment leaves
        every earlier row in place."""
        fields = list(dict.fromkeys(k for r in self.rows for k in r))
        atomic_write_text(self.path, csv_text(fields, self.rows))

    def last_row(self) -> dict:
        """The last epoch's scalars as logged (numbers parsed), {} before the first epoch."""
        if not self.rows:
            return {}
        return {k: float(v) if v not in ("", None) else v for k, v in self.rows[-1].items()}

    def write_unreadable(self) -> None:
        rows = [{"id": i, "source": s, "error": e} for i, (s, e) in sorted(self.unreadable.items())]
        atomic_write_text(self.unreadable_path, csv_text(["id", "source", "error"], rows))

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


def csv_text(fields: list[str], rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\r\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def format_epoch(m: dict) -> str:
    keys = ("train_loss", "lr", "test_top1", "val_top1", "label_correction_accuracy", "noise_precision",
            "noise_recall", "clean_fraction", "train_seconds")
    return f"epoch {m['epoch']}: " + " ".join(f"{k}={m[k]:.4g}" for k in keys if k in m)


def final_summary(cfg: Config, run_dir: Path, metrics: dict, best: dict, accelerator, log: RunLog) -> dict:
    """final.json in the run folder and a short table on stdout (main process): the last epoch (the
    papers' protocol) and the epoch chosen on `select_split` (the noisy val split by default) with every
    split's accuracy at that epoch."""
    keys = [k for k in metrics if k.endswith(("_top1", "_top5")) or k.startswith(("label_correction", "noise_"))]
    from .version import __version__

    summary = {"noisymix_version": __version__, "run_dir": str(run_dir), "method": cfg.method, "epochs": cfg.epochs,
               "world_size": accelerator.num_processes,
               "mixed_precision": accelerator.mixed_precision, "last": {k: metrics[k] for k in keys}, "best": best,
               "unreadable_train_samples": len(log.unreadable),
               "train_seconds_total": metrics.get("train_seconds_total")}
    if accelerator.is_main_process:
        atomic_write_text(run_dir / "final.json", json.dumps(summary, indent=1) + "\n")
        print(f"\nrun {run_dir} finished ({cfg.method}, {cfg.epochs} epochs)")
        for k in keys:
            print(f"  {k:28s} {metrics[k]:.4f}")
        if log.unreadable:
            print(f"  {len(log.unreadable)} distinct unreadable training samples were skipped "
                  f"(ids, source keys, errors: {log.unreadable_path})")
        if best["epoch"] >= 0:
            others = ", ".join(f"{k} {v:.2f}" for k, v in best.items() if k.endswith("_top1") and k != f"{best['split']}_top1")
            print(f"  best epoch {best['epoch']} by {best['split']} (noisy labels): {best['metric']:.2f}"
                  + (f"; at that epoch {others}" if others else ""))
    return summary
