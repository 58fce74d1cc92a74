"""Label-issue report: one row per training sample plus a short markdown summary.

Written at the end of training, or from a checkpoint: `python -m train.report --run RUN_DIR
[--checkpoint last|best|PATH]`. A label is *believed wrong* when the run relabelled it (argmax of the
soft target differs from the given label) or the last GMM gives it P(clean) < 0.5.
"""
from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "train"

from data.atomic import atomic_write, atomic_write_text
from data.reader import ShardDataset

from . import figures
from .checkpoint import find_checkpoint, load_checkpoint
from .figures import confusion_figure, label_issues_figure
from .targets import SoftTargets, Tables

FIGURE_MAX_CLASSES = 100  # confusion matrices beyond this are unreadable
FIGURE_ISSUES = 32  # images in label_issues.png


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
    atomic_write(path, lambda raw: _labels_csv(io.TextIOWrapper(raw, newline="", write_through=True), cols, partners))


def _labels_csv(f, cols: dict, partners: np.ndarray | None) -> None:
    try:
        writer = csv.writer(f)
        writer.writerow([*cols, "neighbours"])
        for i in range(len(cols["sample_id"])):
            row = [cols[k][i] for k in cols]
            row[list(cols).index("true_label")] = "" if cols["true_label"][i] < 0 else int(cols["true_label"][i])
            nb = "" if partners is None else " ".join(str(int(v)) for v in partners[i] if v >= 0)
            writer.writerow([f"{v:.4f}" if isinstance(v, (float, np.floating)) else v for v in row] + [nb])
    finally:
        f.flush()
        f.detach()  # leave the binary file open for atomic_write's fsync


def summary_markdown(cols: dict, class_names: list[str], pictures: list[str] = ()) -> str:
    """How many labels look wrong, per class, top confusions, and precision/recall when truth is known."""
    given, corrected, wrong = cols["given_label"], cols["corrected_label"], cols["believed_wrong"]
    lines = ["# Label issues\n", f"{int(wrong.sum())} of {len(wrong)} training labels are believed wrong "
             f"({100 * wrong.mean():.1f}%); {int((corrected != given).sum())} were relabelled.\n",
             *[f"![{p[:-4].replace('_', ' ')}]({p})\n" for p in pictures],
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


def likely_mislabelled(cols: dict, count: int) -> np.ndarray:
    """Ids of the `count` samples believed wrong with the lowest P(clean) (then the most confident relabel)."""
    ids = np.flatnonzero(cols["believed_wrong"])
    clean = np.nan_to_num(cols["clean_prob"][ids], nan=1.0)
    return ids[np.lexsort((-cols["corrected_prob"][ids], clean))][:count]


def readable_images(train: ShardDataset, ids: np.ndarray, count: int) -> tuple[np.ndarray, list]:
    """The first `count` of `ids` whose image can be read, and their images (unreadable ones are skipped:
    they are already listed in unreadable_train.csv)."""
    kept, images = [], []
    for i in ids:
        try:
            images.append(train.load_image(int(i)))
        except Exception:  # a damaged sample never breaks the report
            continue
        kept.append(int(i))
        if len(kept) == count:
            break
    return np.array(kept, dtype=np.int64), images


def write_figures(run_dir: Path, train: ShardDataset, cols: dict, class_names: list[str], writer=None) -> list[str]:
    """label_issues.png (the images most likely mislabelled, captioned given -> corrected (p)) and the labelled
    confusion matrices (given vs corrected; true vs corrected when the truth is known), also in TensorBoard."""
    names = [n if len(n) <= 12 else n[:11] + "." for n in class_names]
    written = []
    ids, images = readable_images(train, likely_mislabelled(cols, 4 * FIGURE_ISSUES), FIGURE_ISSUES)
    if len(ids):
        captions = [f"{names[cols['given_label'][i]]} -> {names[cols['corrected_label'][i]]} "
                    f"({cols['corrected_prob'][i]:.2f})\nP(clean) {np.nan_to_num(cols['clean_prob'][i], nan=1):.2f}"
                    for i in ids]
        fig = label_issues_figure(images, captions)
        if writer is not None:
            writer.add_figure("labels/likely_mislabelled", fig, 0, close=False)
        figures.save(fig, run_dir / "label_issues.png")
        written.append("label_issues.png")
    if len(class_names) > FIGURE_MAX_CLASSES:
        return written
    known = cols["true_label"] >= 0
    pairs = [("given", "corrected", cols["given_label"], cols["corrected_label"], np.ones_like(known))]
    if known.any():
        pairs.append(("true", "corrected", cols["true_label"], cols["corrected_label"], known))
    for row_name, col_name, rows, columns, mask in pairs:
        fig = confusion_figure(rows[mask], columns[mask], class_names, f"{row_name} label", f"{col_name} label")
        if writer is not None:
            writer.add_figure(f"labels/{col_name}_vs_{row_name}", fig, 0, close=False)
        figures.save(fig, run_dir / f"confusion_{row_name}_{col_name}.png")
        written.append(f"confusion_{row_name}_{col_name}.png")
    return written


def write_report(run_dir: Path, train: ShardDataset, tables: Tables, class_names: list[str], writer=None) -> dict:
    """labels.csv, labels_summary.md and the figures in the run folder (figures also in TensorBoard)."""
    cols = label_rows(train, tables)
    write_labels_csv(run_dir / "labels.csv", cols, tables.partners)
    pictures = write_figures(run_dir, train, cols, class_names, writer)
    atomic_write_text(run_dir / "labels_summary.md", summary_markdown(cols, class_names, pictures))
    return cols


def tables_from_checkpoint(state: dict, train: ShardDataset) -> Tables:
    """Rebuild the per-sample tables saved in a checkpoint."""
    targets = SoftTargets(train.labels, state["targets"]["num_classes"], state["targets"]["topk"])
    targets.load_state_dict(state["targets"])
    as_numpy = lambda t: None if t is None else t.numpy()
    return Tables(targets, as_numpy(state["clean"]), as_numpy(state["partners"]))


def main(argv=None) -> int:
    from data.shards import read_manifest
    from data.transforms import get_preset
    from .config import config_of_checkpoint
    from .dataset import data_root

    from data.atomic import WriteFailed
    from data.shards import ShardError

    from .config import UserError

    p = argparse.ArgumentParser(prog="python -m train.report", description=__doc__)
    p.add_argument("--run", required=True, type=Path, help="a run folder (train/main.py's output/<run_name>)")
    p.add_argument("--checkpoint", default="last", help="last | best | a checkpoint path")
    args = p.parse_args(argv)
    try:
        if not args.run.is_dir():
            raise UserError(f"--run {args.run}: no such run folder")
        state = load_checkpoint(find_checkpoint(args.run, args.checkpoint))
        cfg = config_of_checkpoint(state)
        root = data_root(cfg)
        train = ShardDataset(root / cfg.train_split, mode=get_preset(cfg.dataset, cfg.image_size or None).mode)
        if len(state["targets"]["values"]) != len(train):
            raise UserError(f"{root / cfg.train_split}: {len(train)} samples, the run's tables hold "
                            f"{len(state['targets']['values'])}: the data set was prepared again since the run")
        write_report(args.run, train, tables_from_checkpoint(state, train), read_manifest(root)["class_names"])
    except (UserError, ShardError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except WriteFailed as e:
        print(f"error: {e.strerror}", file=sys.stderr)
        return 2
    print(f"wrote {args.run / 'labels.csv'}, {args.run / 'labels_summary.md'} and its figures")
    return 0


if __name__ == "__main__":
    sys.exit(main())
