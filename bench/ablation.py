"""Ablation of the methods' choices on a real data set, chosen on the noisy val split (never on test).

    python bench/ablation.py --dataset fashion-mnist --noises instance:0.4,symmetric:0.8 \
        --variants ce,select,mixnn,mixnn-poolclean,"mixnn+ema=0.5" --seeds 0 --epochs 20 [--train-subset 12000] \
        [--reuse] [extra --key value ...]

Variants are bench/common.py VARIANTS names, optionally with `+key=value` overrides. Prints one row per
variant: accuracy on the noisy val split at the last epoch (what a user can see, and what the choice is
made on), then for information test accuracy at the last epoch, test accuracy at the best-val epoch and
label-correction accuracy; the rows are ordered by mean noisy-val accuracy.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import add_grid_arguments, best_per_seed, fmt, mean, parse_grid, per_seed, run_grid


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_grid_arguments(p)
    p.add_argument("--variants", default="ce,select,select-correct,mixnn,mixnn-randpartner")
    p.add_argument("--out", type=Path, default=Path("runs/bench-ablation"))
    p.set_defaults(dataset="fashion-mnist", noises="instance:0.4,symmetric:0.8", seeds="0", epochs=20,
                   val_fraction=0.05)
    args, extra, noises, variants, seeds = parse_grid(p, "variants")
    t0 = time.time()
    results = run_grid(args, noises, variants, seeds, extra)
    print(f"\n{len(results)} runs, {args.epochs} epochs, {args.dataset}"
          f"{f' (train subset {args.train_subset})' if args.train_subset else ''}, {time.time() - t0:.0f} s wall\n")
    get = lambda n, v, key: per_seed(results, n, v, seeds, key)
    score = {v: mean([mean(get(n, v, "val_top1")) for n in noises]) or 0.0 for v in variants}
    print("| variant | " + " | ".join(f"{n} noisy val (last) | {n} test (last) | {n} test (best val) | "
                                       f"{n} label corr." for n in noises) + " |")
    print("|---" * (1 + 4 * len(noises)) + "|")
    for v in sorted(variants, key=lambda v: -score[v]):
        cells = []
        for n in noises:
            cells += [fmt(get(n, v, "val_top1")), fmt(get(n, v, "test_top1")), fmt(best_per_seed(results, n, v, seeds)),
                      fmt(get(n, v, "label_correction_accuracy"), 100)]
        print(f"| {v} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
