"""Label-issue report: one row per training sample plus a short markdown summary.

Written at the end of training, or from a checkpoint: `python -m train.report --run RUN_DIR
[--checkpoint last|best|PATH]`. A label is *believed wrong* when the run relabelled it (argmax of the
soft target differs from the given label) or the last GMM gives it P(clean) < 0.5.
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "train"

from data.reader import ShardDataset

from .checkpoint import find_checkpoint, load_checkpoint
from .methods import Tables
from .targets import SoftTargets

FIGURE_MAX_CLASSES = 100


def label_rows(train: ShardDataset, tables: Tables) -> dict[str, np.ndarray]:
    """Per-sample-id columns of the report."""
    corrected = tables.targets.corrected()
    n = len(train)
    clean = tables.clean if tables.clean is not None else np.full(n, np.nan, np.float32)
    suspect = np.nan_to_num(clean, nan=1.0) < 0.5
    return {"sample_id": np.arange(n), "source": train.sources, "given_label": train.labels,
            "corrected_label": corrected, "corrected_prob": tables.targets.confidence(),
            "clean_prob": clean, "true_label": train.true_labels,
            "believed_wrong": (corrected != train.labels) | suspect}


def write_labels_csv(path: Path, cols: dict, partners: np.ndarray | None) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*cols, "neighbours"])
        for i in range(len(cols["sample_id"])):
            row = [cols[k][i] for k in cols]
            row[list(cols).index("true_label")] = "" if cols["true_label"][i] < 0 else int(cols["true_label"][i])
            nb = "" if partners is None else " ".join(str(int(v)) for v in partners[i] if v >= 0)
            writer.writerow([f"{v:.4f}" if isinstance(v, (float, np.floating)) else v for v in row] + [nb])


def summary_markdown(cols: dict, class_names: list[str]) -> str:
    """How many labels look wrong, per class, top confusions, and precision/recall when truth is known."""
    given, corrected, wrong = cols["given_label"], cols["corrected_label"], cols["believed_wrong"]
    lines = ["# Label issues\n", f"{int(wrong.sum())} of {len(wrong)} training labels are believed wrong "
             f"({100 * wrong.mean():.1f}%); {int((corrected != given).sum())} were relabelled.\n",
             "| given class | samples | believed wrong | % |", "|---|---|---|---|"]
    for c, name in enumerate(class_names):
        m = given == c
        if m.any():
            lines.append(f"| {name} | {int(m.sum())} | {int(wrong[m].sum())} | {100 * wrong[m].mean():.1f} |")
    pairs, counts = np.unique(np.stack([given, corrected], 1)[corrected != given], axis=0, return_counts=True)
    lines += ["", "## Top confusions (given -> corrected)", "", "| given | corrected | samples |", "|---|---|---|"]
    for k in np.argsort(-counts, kind="stable")[:10]:
        lines.append(f"| {class_names[pairs[k][0]]} | {class_names[pairs[k][1]]} | {int(counts[k])} |")
    known = cols["true_label"] >= 0
    if known.any():
        truly = given[known] != cols["true_label"][known]
        hits = (truly & wrong[known]).sum()
        lines += ["", "## Against the true labels", "",
                  f"- truly wrong: {int(truly.sum())} of {int(known.sum())} samples with a known true label",
                  f"- precision of 'believed wrong': {hits / max(wrong[known].sum(), 1):.3f}",
                  f"- recall of 'believed wrong': {hits / max(truly.sum(), 1):.3f}",
                  f"- corrected label = true label: {(corrected[known] == cols['true_label'][known]).mean():.3f}"]
    return "\n".join(lines) + "\n"


def confusion_image(corrected: np.ndarray, true: np.ndarray, num_classes: int, scale: int = 8) -> np.ndarray:
    """[1, H, W] row-normalised confusion (rows: true, columns: corrected), for TensorBoard (Fig. 8)."""
    known = true >= 0
    matrix = np.zeros((num_classes, num_classes))
    np.add.at(matrix, (true[known], corrected[known]), 1)
    matrix /= np.maximum(matrix.sum(1, keepdims=True), 1)
    return np.kron(matrix, np.ones((scale, scale)))[None].astype(np.float32)


def write_report(run_dir: Path, train: ShardDataset, tables: Tables, class_names: list[str], writer=None) -> dict:
    """labels.csv + labels_summary.md in the run folder (and the confusion figure when truth is known)."""
    cols = label_rows(train, tables)
    write_labels_csv(run_dir / "labels.csv", cols, tables.partners)
    (run_dir / "labels_summary.md").write_text(summary_markdown(cols, class_names))
    if writer is not None and (train.true_labels >= 0).any() and len(class_names) <= FIGURE_MAX_CLASSES:
        writer.add_image("labels/corrected_vs_true", confusion_image(cols["corrected_label"], train.true_labels,
                                                                     len(class_names)), 0)
    return cols


def tables_from_checkpoint(state: dict, train: ShardDataset) -> Tables:
    """Rebuild the per-sample tables saved in a checkpoint."""
    targets = SoftTargets(train.labels, state["targets"]["num_classes"], state["targets"]["topk"])
    targets.load_state_dict(state["targets"])
    as_numpy = lambda t: None if t is None else t.numpy()
    return Tables(targets, as_numpy(state["clean"]), as_numpy(state["partners"]))


def main(argv=None) -> int:
    from data.shards import read_manifest
    from .config import config_of_checkpoint
    from .dataset import data_root

    p = argparse.ArgumentParser(prog="python -m train.report", description=__doc__)
    p.add_argument("--run", required=True, type=Path)
    p.add_argument("--checkpoint", default="last", help="last | best | a checkpoint path")
    args = p.parse_args(argv)
    state = load_checkpoint(find_checkpoint(args.run, args.checkpoint))
    cfg = config_of_checkpoint(state)
    root = data_root(cfg)
    train = ShardDataset(root / cfg.train_split)
    write_report(args.run, train, tables_from_checkpoint(state, train), read_manifest(root)["class_names"])
    print(f"wrote {args.run / 'labels.csv'} and {args.run / 'labels_summary.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
