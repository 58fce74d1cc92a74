"""Methods side by side under label noise, several seeds: the project's robustness benchmark.

    python bench/noise_robustness.py [--dataset digits|fashion-mnist|cifar10|cifar100]
        [--noises symmetric:0.4,symmetric:0.8,pairflip:0.4] [--methods ce,clean,mixnn,selectmix,...]
        [--seeds 0,1] [--epochs 60] [--parallel 2] [--reuse] [--cleanlab-mlp] [extra --key value ...]

Methods are bench/common.py VARIANTS names (ce, clean = CE on the clean labels, the ceiling; mixup,
mixnn, mixnn-paper, mixnn-randpartner and the other ablations; select, select-correct,
confident-learning, selectmix, selectmix-precursor), optionally with `+key=value` overrides.
`--cleanlab-mlp` adds cleanlab's CleanLearning around a scikit-learn MLP (digits only).

Prints per noise: test accuracy at the last epoch (mean ± std over seeds) and at the epoch chosen on the
noisy val split, the share of the gap to the clean-label ceiling closed ((method - CE) / (clean - CE), last
epoch, when ce and clean are in the grid), label-correction accuracy, and the diagnostics of kNN vs random
partners (among truly mislabelled anchors: nearest neighbour's given label = anchor's true label, the same
for a partner drawn at random (chance), neighbour truly clean, share of mislabelled anchors that Eq. 10/11's
weights drop from their mixed sample) and of memorisation (train accuracy against the given labels on truly
mislabelled samples).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from common import REPO, add_grid_arguments, best_per_seed, data_dir, fmt, mean, parse_grid, per_seed, run_grid


def cleanlab_mlp(args, noise: str, seed: int) -> dict:
    """External reference: cleanlab's CleanLearning around a scikit-learn MLP on the same split and noise."""
    from cleanlab.classification import CleanLearning
    from sklearn.neural_network import MLPClassifier

    sys.path.insert(0, str(REPO))
    from data.reader import ShardDataset

    root = data_dir(args.workdir, args.dataset, noise, seed, args.val_fraction, args.train_subset)
    arrays = {}
    for split in ("train", "test"):
        ds = ShardDataset(root / split, mode="L")
        arrays[split] = (np.stack([np.asarray(ds.load_image(i), np.float32).ravel() / 255 for i in range(len(ds))]),
                         ds.labels)
    model = CleanLearning(MLPClassifier(hidden_layer_sizes=(128,), max_iter=500, random_state=seed), seed=seed)
    model.fit(*arrays["train"])
    return {"test_top1": 100 * float((model.predict(arrays["test"][0]) == arrays["test"][1]).mean())}


def table(results: dict, noises: list[str], methods: list[str], seeds: list[int]) -> list[str]:
    """The markdown table, one row per method."""
    get = lambda n, m, key: per_seed(results, n, m, seeds, key)

    def gap(n, m):
        ce, clean, value = mean(get(n, "ce", "test_top1")), mean(get(n, "clean", "test_top1")), \
            mean(get(n, m, "test_top1"))
        if None in (ce, clean, value) or clean <= ce or m in ("ce", "clean"):
            return "-"
        return f"{(value - ce) / (clean - ce):+.2f}"

    head = ["method"]
    for n in noises:
        head += [f"{n} test (last)", f"{n} test (best val)", f"{n} gap closed", f"{n} label corr.",
                 f"{n} NN given = true", f"{n} random partner given = true", f"{n} NN truly clean",
                 f"{n} mislabelled anchors dropped", f"{n} fit wrong labels"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for m in methods:
        cells = [m]
        for n in noises:
            cells += [fmt(get(n, m, "test_top1")), fmt(best_per_seed(results, n, m, seeds)), gap(n, m),
                      fmt(get(n, m, "label_correction_accuracy"), 100) if m.startswith(("mixnn", "select-")) else "-",
                      fmt(get(n, m, "nn_given_is_anchor_true"), 100),
                      fmt(get(n, m, "nn_chance_given_is_anchor_true"), 100),
                      fmt(get(n, m, "nn_truly_clean"), 100), fmt(get(n, m, "nn_noisy_anchor_dropped"), 100),
                      fmt(get(n, m, "train_acc_given_truly_noisy"), 100)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_grid_arguments(p)
    p.add_argument("--methods", default="ce,clean,mixnn,selectmix")
    p.add_argument("--cleanlab-mlp", action="store_true", help="add cleanlab CleanLearning + MLP (digits)")
    p.add_argument("--out", type=Path, default=Path("runs/bench-robustness"))
    args, extra, noises, methods, seeds = parse_grid(p, "methods")
    t0 = time.time()
    results = run_grid(args, noises, methods, seeds, extra)
    if args.cleanlab_mlp:
        methods.append("cleanlab-mlp")
        results.update({(n, "cleanlab-mlp", s): cleanlab_mlp(args, n, s) for n in noises for s in seeds})
    seconds = {m: mean([(results.get((n, m, s)) or {}).get("seconds") for n in noises for s in seeds]) for m in methods}
    print(f"\n{len(results)} runs, {args.epochs} epochs each, {args.dataset}"
          f"{f' (train subset {args.train_subset})' if args.train_subset else ''}, "
          f"{time.time() - t0:.0f} s wall with {args.parallel} in parallel\n")
    print("\n".join(table(results, noises, methods, seeds)))
    print("\nmean wall time of one run (s, all its stages): " +
          ", ".join(f"{m} {s:.0f}" for m, s in seconds.items() if s))


if __name__ == "__main__":
    main()
