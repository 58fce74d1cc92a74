"""Does the feature space know more than the classifier? On a finished run with known true labels: the
network's own prediction against a k-NN vote of GMM-clean neighbours, on the samples the GMM judges noisy.

    python bench/knn_vote.py --run RUN_DIR [--checkpoint last|best|PATH] [--k 1,10,50] [--threshold 0.5]
        [--metric l2|cosine] [--batch-size 256]

Loads the checkpoint's model and the GMM clean probabilities it saved (a method with a refresh pass:
mixnn, select, select-correct, ...), runs the refresh pass over the training split (eval transform, no
augmentation), and prints one markdown row per k: among the samples with P(clean) <= threshold, how often
the network's argmax is the true label, and how often the most frequent *given* label of the k nearest
samples with P(clean) > threshold is (ties: the smaller class id). This is the information MixNN's
neighbours (with `neighbour_pool: clean`) and any neighbour-based label correction can add: if the vote is
no better than the argmax, neighbours carry nothing the classifier head does not. Needs true labels
(synthetic noise); one process, exact search.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def neighbour_votes(labels: np.ndarray, neighbours: np.ndarray, k: int, num_classes: int) -> np.ndarray:
    """[q] the most frequent label among the first k neighbours of each row (-1 entries ignored; ties: the
    smaller class id; -1 where a row has no neighbour)."""
    nb = neighbours[:, :k]
    counts = np.zeros((len(nb), num_classes), np.int64)
    rows, cols = np.nonzero(nb >= 0)
    np.add.at(counts, (rows, labels[nb[rows, cols]]), 1)
    return np.where(counts.any(1), counts.argmax(1), -1)


def vote_table(embeddings: np.ndarray, probs: np.ndarray, given: np.ndarray, true: np.ndarray, clean: np.ndarray,
               ks: list[int], threshold: float = 0.5, metric: str = "l2") -> list[dict]:
    """Rows {k, queries, pool, argmax, vote} (accuracies against `true` on the GMM-noisy samples); all
    arrays are indexed alike, one row per training sample."""
    from index.knn import ShardSearcher, prepare_embeddings

    pool = clean > threshold
    x = prepare_embeddings(embeddings, metric)
    queries = np.flatnonzero(~pool)
    _, pos = ShardSearcher(x[pool], metric).search(x[queries], max(ks))
    members = np.flatnonzero(pool)
    neighbours = np.where(pos >= 0, members[np.maximum(pos, 0)], -1)  # pool positions -> sample rows
    argmax = float((probs[queries].argmax(1) == true[queries]).mean()) if len(queries) else float("nan")
    return [{"k": k, "queries": len(queries), "pool": int(pool.sum()), "argmax": argmax,
             "vote": float((neighbour_votes(given, neighbours, k, probs.shape[1]) == true[queries]).mean())
             if len(queries) else float("nan")} for k in ks]


def refresh_run(run: Path, checkpoint: str, batch_size: int):
    """(embeddings, probs, given, true, clean) over the run's training split, rows by sample id."""
    import torch
    from accelerate import Accelerator

    from data.reader import ShardDataset
    from data.transforms import EvalTransform, get_preset
    from train.checkpoint import find_checkpoint, load_checkpoint
    from train.config import config_of_checkpoint
    from train.dataset import data_root
    from train.loop import batched, refresh
    from train.methods import create_run_model

    state = load_checkpoint(find_checkpoint(run, checkpoint))
    if state.get("clean") is None:
        raise SystemExit(f"{run}: the checkpoint holds no GMM clean probabilities (method "
                         f"{state['config']['method']!r} has no refresh pass, or the run stopped in warm-up)")
    cfg = config_of_checkpoint(state)
    preset = get_preset(cfg.dataset, cfg.image_size or None)
    train = ShardDataset(data_root(cfg) / cfg.train_split, EvalTransform(preset=preset), preset.mode)
    if (train.true_labels < 0).any():
        raise SystemExit(f"{data_root(cfg)}: no true labels for the training split; the vote needs synthetic noise")
    model = create_run_model(cfg, state["targets"]["num_classes"], 1 if preset.mode == "L" else 3)
    model.load_state_dict(state["model"])
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    stats = refresh(accelerator.prepare(model), train, batched(np.arange(len(train)), batch_size), accelerator, 0)
    ids = stats.ids  # unreadable samples are skipped by the refresh
    return (stats.embeddings, stats.probs, train.labels[ids], train.true_labels[ids], state["clean"].numpy()[ids],
            state["epoch"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench/knn_vote.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, type=Path)
    p.add_argument("--checkpoint", default="last")
    p.add_argument("--k", default="1,10,50", help="comma-separated neighbour counts")
    p.add_argument("--threshold", type=float, default=0.5, help="P(clean) above it: in the neighbour pool")
    p.add_argument("--metric", default="l2", choices=("l2", "cosine"))
    p.add_argument("--batch-size", type=int, default=256)
    args = p.parse_args(argv)
    embeddings, probs, given, true, clean, epoch = refresh_run(args.run, args.checkpoint, args.batch_size)
    rows = vote_table(embeddings, probs, given, true, clean, [int(k) for k in args.k.split(",")], args.threshold,
                      args.metric)
    pool = clean > args.threshold
    print(f"{args.run.name}, after {epoch} epochs: {pool.sum()} samples in the pool (P(clean) > {args.threshold}, "
          f"{(given[pool] == true[pool]).mean():.1%} truly clean), {(~pool).sum()} queries "
          f"({(given[~pool] != true[~pool]).mean():.1%} truly mislabelled)\n")
    print("| k | network argmax = true | k-NN vote of clean neighbours = true |\n|---|---|---|")
    for r in rows:
        print(f"| {r['k']} | {r['argmax']:.1%} | {r['vote']:.1%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
