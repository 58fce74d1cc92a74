"""Side by side on the same shards: the authors' own scripts (minimally adapted, bench/authors_*.py) against
our configurations of the same method.

    python bench/authors_compare.py --method mixnn --authors MIXNN_CHECKOUT \
        --ours mixnn-authors,mixnn --noises symmetric:0.4,symmetric:0.8 --seeds 0,1 --reuse
    python bench/authors_compare.py --method dividemix --authors DIVIDEMIX_CHECKOUT --ours dividemix ...

Both sides train on digits with our digits schedule (60 epochs, 5 warm-up epochs, E_s 10 in the authors'
1-based count, lr 0.05, batch 64, small_cnn); our side runs through bench/common.py like every grid
benchmark (variant `mixnn-authors` = launch/configs/mixnn_authors.yaml with their GMM window rule). Prints last-epoch test accuracy
(mean ± std over seeds, each seed's value in brackets) and the label-correction accuracy of the soft
targets where the method keeps them.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import REPO, add_grid_arguments, data_dir, fmt, per_seed, prepare, run_variant

ADAPTERS = {"mixnn": "authors_mixnn.py", "dividemix": "authors_dividemix.py"}


def authors_arguments(method: str, noise: str, epochs: int) -> list[str]:
    """The digits schedule in the authors' own terms (1-based epochs)."""
    rate = noise.split(":")[1]
    if method == "mixnn":  # warm-up while epoch < 6 (5 epochs), soft-label loss from epoch 10
        return ["--r", rate, "--epochs", str(epochs), "--warmup", "6", "--es", "10", "--lr", "0.05", "--batch-size", "64"]
    return ["--r", rate, "--epochs", str(epochs), "--warmup", "5", "--lr", "0.05", "--batch-size", "64"]


def our_variant(method: str, variant: str, noise: str) -> str:
    """`mixnn-authors` / `dividemix-authors` with their authors' noise-dependent GMM window (5 refreshes only at
    r = 0.8, train_cifar_with_MixNN.py:214; only at r = 0.9, Train_cifar.py:178); every other variant as named."""
    rate = float(noise.split(":")[1])
    if variant == "mixnn-authors" and rate == 0.8 or variant == "dividemix-authors" and rate == 0.9:
        return variant + "+gmm_loss_window=5"  # DivideMix's Train_cifar.py:178 averages only at 0.9
    return variant


def run_authors(args, noise: str, seed: int) -> dict | None:
    out = args.out / f"authors-{args.method}-{noise.replace(':', '')}-s{seed}"
    data = data_dir(args.workdir, args.dataset, noise, seed, args.val_fraction, args.train_subset)
    cmd = [sys.executable, str(REPO / "bench" / ADAPTERS[args.method]), "--authors", str(args.authors),
           "--data", str(data), "--dataset", args.dataset, "--seed", str(seed), "--threads", str(args.threads),
           "--out", str(out), *authors_arguments(args.method, noise, args.epochs), *(["--reuse"] if args.reuse else [])]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    (args.out / f"{out.name}.log").write_text(result.stdout[-200_000:] + result.stderr[-50_000:])
    if result.returncode:
        print(f"{out.name} failed:\n{result.stderr[-3000:]}", file=sys.stderr, flush=True)
        return None
    return json.loads((out / "result.json").read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_grid_arguments(p)
    p.add_argument("--method", choices=sorted(ADAPTERS), default="mixnn")
    p.add_argument("--authors", type=Path, required=True, help="checkout of the authors' repository")
    p.add_argument("--ours", default="mixnn-authors,mixnn", help="bench/common.py variants to set beside them")
    p.add_argument("--out", type=Path, default=Path("runs/bench-authors"))
    p.set_defaults(noises="symmetric:0.4,symmetric:0.8")
    args, extra = p.parse_known_args()
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    noises, seeds = args.noises.split(","), [int(s) for s in args.seeds.split(",")]
    ours = [v for v in args.ours.split(",") if v]
    t0 = time.time()
    for noise, seed in itertools.product(noises, seeds):
        prepare(args.workdir, args.dataset, noise, seed, args.val_fraction, args.train_subset, args.raw)
    jobs = [(n, "authors", s) for n, s in itertools.product(noises, seeds)]
    jobs += [(n, v, s) for n, v, s in itertools.product(noises, ours, seeds)]

    def one(job):
        noise, name, seed = job
        if name == "authors":
            return run_authors(args, noise, seed)
        return run_variant(args, extra, noise, our_variant(args.method, name, noise), seed)

    with ThreadPoolExecutor(args.parallel) as pool:
        results = dict(zip(jobs, pool.map(one, jobs)))
    print(f"\n{args.method} on {args.dataset}, {args.epochs} epochs, seeds {args.seeds}, {time.time() - t0:.0f} s wall\n")
    print("| run | " + " | ".join(f"{n} test (last) | {n} label corr." for n in noises) + " |")
    print("|---" * (1 + 2 * len(noises)) + "|")
    for name in ["authors", *ours]:
        cells = []
        for n in noises:
            test = per_seed(results, n, name, seeds, "test_top1")
            each = " / ".join("-" if t is None else f"{t:.1f}" for t in test)
            cells += [f"{fmt(test)} ({each})", fmt(per_seed(results, n, name, seeds, "label_correction_accuracy"), 100)]
        label = f"authors' script ({ADAPTERS[args.method]})" if name == "authors" else name
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
