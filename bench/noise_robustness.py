"""CE vs MixNN (and other methods) on the built-in digits set under label noise, several seeds.

    python bench/noise_robustness.py [--noises symmetric:0.4,symmetric:0.8,pairflip:0.4]
        [--methods ce,mixnn,selectmix,cleanlab-mlp,mixnn-avg,...] [--seeds 0,1,2] [--parallel 2]
        [--epochs 60] [--dataset digits|cifar10|cifar100] [--reuse] [extra --key value ...]

Method names: ce, mixup, mixnn, selectmix, cleanlab-mlp (cleanlab's CleanLearning + scikit-learn MLP,
digits only), and MixNN ablations mixnn-avg, mixnn-random (weights), mixnn-nocorr (no label
correction), mixnn-randpartner, mixnn-batch (in-batch neighbours), mixnn-window1, mixnn-corrloss, mixnn-refresh2
(tables refreshed every 2nd epoch).

Prints a markdown table: test accuracy (mean +- std over seeds, last epoch) and label-correction
accuracy (argmax of the soft targets = true label, over the training set).
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

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def cleanlab_mlp(noise: str, seed: int, workdir: Path) -> dict:
    """External reference: cleanlab's CleanLearning around a scikit-learn MLP on the same split and noise."""
    from cleanlab.classification import CleanLearning
    from sklearn.neural_network import MLPClassifier

    sys.path.insert(0, str(REPO))
    from data.reader import ShardDataset

    root = workdir / "shards" / f"digits-{noise.replace(':', '')}-s{seed}"
    arrays = {}
    for split in ("train", "test"):
        ds = ShardDataset(root / split, mode="L")
        arrays[split] = (np.stack([np.asarray(ds.load_image(i), np.float32).ravel() / 255 for i in range(len(ds))]),
                         ds.labels)
    model = CleanLearning(MLPClassifier(hidden_layer_sizes=(128,), max_iter=500, random_state=seed), seed=seed)
    model.fit(*arrays["train"])
    return {"test_top1": 100 * float((model.predict(arrays["test"][0]) == arrays["test"][1]).mean())}


def run_one(noise: str, method: str, seed: int, args, extra: list[str]) -> dict:
    """Train one configuration in a subprocess; returns its final.json."""
    if method == "cleanlab-mlp":
        return cleanlab_mlp(noise, seed, args.workdir)
    name = f"{method}-{noise.replace(':', '')}-s{seed}"
    done = args.out / name / "final.json"
    if args.reuse and done.is_file() and json.loads(done.read_text())["epochs"] == args.epochs:
        return json.loads(done.read_text())["last"]
    method_args = ["--method", method]
    if method.startswith("mixnn-"):  # ablation shorthands
        ablation = method.split("-", 1)[1]
        method_args = ["--method", "mixnn", *{
            "avg": ["--weights", "avg"], "random": ["--weights", "random"],
            "nocorr": ["--correction_epoch", "-1"], "randpartner": ["--partners", "random"],
            "corrloss": ["--gmm_loss", "corrected", "--gmm_loss_window", "1"], "window5": ["--gmm_loss_window", "5"],
            "window1": ["--gmm_loss_window", "1"], "refresh2": ["--refresh_every", "2"],
            "batch": ["--knn_scope", "batch"]}[ablation]]
    data = ["--noise", noise, "--noise_seed", str(seed)]
    if args.dataset != "digits":  # shards the user prepared: SHARDS/<dataset>-<noise>-s<seed>
        data = ["--config", str(REPO / "launch" / "configs" / f"{args.dataset}.yaml"),
                "--data", str(dataset_dir(args, noise, seed))]
    cmd = [sys.executable, str(REPO / "train" / "main.py"), *data,
           "--seed", str(seed), "--epochs", str(args.epochs), "--output", str(args.out), "--run_name", name,
           "--progress", "false", "--eval_every", str(args.epochs), *method_args, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=args.workdir)
    if result.returncode:
        raise RuntimeError(f"{name} failed:\n{result.stderr[-3000:]}")
    return json.loads((args.out / name / "final.json").read_text())["last"]


def dataset_dir(args, noise: str, seed: int) -> Path:
    """Where a run's shards live: digits are made here, other data sets must be prepared beforehand."""
    root = args.workdir / "shards" / f"{args.dataset}-{noise.replace(':', '')}-s{seed}"
    if args.dataset != "digits" and not (root / "dataset.json").is_file():
        raise SystemExit(f"{root} missing: python -m data.prepare {args.dataset} --root RAW --out {root} "
                         f"--noise {noise} --seed {seed}")
    return root


def prepare_digits(noise: str, seed: int, workdir: Path) -> None:
    """The folder train/main.py would prepare on first use (same name), made here before runs race for it."""
    out = workdir / "shards" / f"digits-{noise.replace(':', '')}-s{seed}"
    if not (out / "dataset.json").is_file():
        subprocess.run([sys.executable, "-m", "data.prepare", "digits", "--out", str(out), "--noise", noise,
                        "--seed", str(seed)], check=True, capture_output=True, cwd=REPO)


def fmt(values: list[float], scale: float = 1.0) -> str:
    v = np.array([x for x in values if x is not None], dtype=float) * scale
    return f"{v.mean():.1f} ± {v.std():.1f}" if len(v) else "-"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--noises", default="symmetric:0.4,symmetric:0.8,pairflip:0.4")
    p.add_argument("--methods", default="ce,mixnn")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--parallel", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("runs/bench-robustness"))
    p.add_argument("--dataset", default="digits", help="digits, or cifar10/cifar100 (with a GPU and the "
                   "data prepared as shards/<dataset>-<noise>-s<seed>; uses launch/configs/<dataset>.yaml)")
    p.add_argument("--reuse", action="store_true", help="keep finished runs of an interrupted benchmark")
    p.add_argument("--workdir", type=Path, default=Path.cwd())
    args, extra = p.parse_known_args()
    args.out = args.out.resolve()
    noises, methods = args.noises.split(","), args.methods.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    grid = list(itertools.product(noises, methods, seeds))
    t0 = time.time()
    # prepare each noisy data set once, serially, before the parallel runs race to create it
    for noise, seed in itertools.product(noises, seeds):
        prepare_digits(noise, seed, args.workdir) if args.dataset == "digits" else dataset_dir(args, noise, seed)
    with ThreadPoolExecutor(args.parallel) as pool:
        results = dict(zip(grid, pool.map(lambda g: run_one(*g, args, extra), grid)))
    print(f"\n{len(grid)} runs, {args.epochs} epochs each, {time.time() - t0:.0f} s wall with {args.parallel} in parallel\n")
    print("| method | " + " | ".join(f"{n} test acc" for n in noises) + " | " +
          " | ".join(f"{n} label corr." for n in noises) + " |")
    print("|---" * (1 + 2 * len(noises)) + "|")
    for m in methods:
        acc = [fmt([results[(n, m, s)]["test_top1"] for s in seeds]) for n in noises]
        corr = [fmt([results[(n, m, s)].get("label_correction_accuracy") for s in seeds], 100) for n in noises]
        print(f"| {m} | " + " | ".join(acc + corr) + " |")


if __name__ == "__main__":
    main()
