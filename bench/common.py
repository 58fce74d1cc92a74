"""What the robustness and ablation benchmarks share: preparing each noisy data set once, running one
training configuration in a subprocess (kept with --reuse), reading its results, formatting tables.

Method names are `VARIANTS` keys: a method and the options that make the variant, e.g. `mixnn-randpartner`.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RAW = {"fashion-mnist": "/usr/share/datasets/fashion-mnist", "mnist": "/usr/share/datasets/mnist"}
CONFIGS = {"fashion-mnist": "fashion_mnist", "cifar10": "cifar10", "cifar100": "cifar100"}

# name -> training arguments. "clean" trains CE on the data set prepared without noise (the ceiling).
GLOBAL = ["--method", "mixnn", "--config_overlay", "mixnn_global"]  # MixNN with the paper's global search
VARIANTS = {
    "ce": ["--method", "ce"],
    "clean": ["--method", "ce"],
    "mixup": ["--method", "mixup"],
    "select": ["--method", "select"],
    "select-correct": ["--method", "select-correct"],
    "confident-learning": ["--method", "confident-learning"],
    "selectmix": ["--method", "selectmix"],
    "selectmix-mismatch": ["--method", "selectmix", "--selectmix_rule", "mismatch"],  # the rule of selectmix_paper.yaml
    "selectmix-precursor": ["--method", "selectmix", "--selectmix_rule", "precursor"],
    "selectmix-cleanlab": ["--method", "selectmix", "--selectmix_rule", "cleanlab"],
    "mixnn": ["--method", "mixnn"],
    # DivideMix with the authors' CIFAR settings (alpha 4, lambda_u 25, T 0.5, p_threshold 0.5) on the data
    # set's own network, epochs, warm-up and schedule, like every other row, and the GMM on losses averaged
    # over the last 5 refreshes (what the robustness tables measured; the authors do so only at 90% noise)
    "dividemix": ["--method", "dividemix", "--mixup_alpha", "4", "--gmm_loss_window", "5"],
    "dividemix-authors": ["--method", "dividemix"],  # its defaults: the authors' Train_cifar.py (window 1 below 90%)
    # MixNN as the paper describes it (Eq. 10/11 weights, all-sample neighbours, EMA 0.9 toward p from E_s)
    "mixnn-paper": ["--method", "mixnn", "--config_overlay", "mixnn_paper"],
    "mixnn-global": ["--method", "mixnn", "--config_overlay", "mixnn_global"],  # the paper's global search
    # ablations of MixNN with the paper's global search (launch/configs/mixnn_global.yaml)
    "mixnn-avg": [*GLOBAL, "--weights", "avg"],
    "mixnn-random": [*GLOBAL, "--weights", "random"],
    "mixnn-beta": [*GLOBAL, "--weights", "beta"],
    "mixnn-nocorr": [*GLOBAL, "--correction_epoch", "-1"],
    "mixnn-randpartner": [*GLOBAL, "--partners", "random"],
    "mixnn-batch": [*GLOBAL, "--knn_scope", "batch"],
    "mixnn-window1": [*GLOBAL, "--gmm_loss_window", "1"],
    "mixnn-window5": [*GLOBAL, "--gmm_loss_window", "5"],
    "mixnn-corrloss": [*GLOBAL, "--gmm_loss", "corrected", "--gmm_loss_window", "1"],
    "mixnn-refresh2": [*GLOBAL, "--refresh_every", "2"],
    "mixnn-poolclean": [*GLOBAL, "--neighbour_pool", "clean"],
    "mixnn-poolclass": [*GLOBAL, "--neighbour_pool", "class"],
    "mixnn-mixstart": [*GLOBAL, "--mix_start", "correction"],
    "mixnn-cosine": [*GLOBAL, "--metric", "cosine"],
    "mixnn-refined": [*GLOBAL, "--target_source", "refined"],
    "mixnn-update10": [*GLOBAL, "--target_update_every", "10"],  # the MixNN authors' target period
    # the MixNN authors' released script (launch/configs/mixnn_authors.yaml; digits.yaml's E_s 9 is their es 10);
    # bench/authors_compare.py adds their noise-dependent GMM window. Then each of its settings alone:
    "mixnn-authors": ["--method", "mixnn", "--config_overlay", "mixnn_authors"],
    "mixnn-probloss": [*GLOBAL, "--early_loss", "prob"],
    "mixnn-plainwarmup": [*GLOBAL, "--warmup_data", "plain"],
    "mixnn-batchtrain": [*GLOBAL, "--knn_scope", "batch", "--batch_knn_mode", "train"],
    "mixnn-globalgmm": [*GLOBAL, "--gmm_split", "global", "--gmm_scale", "linear"],
    "mixnn-corrected": [*GLOBAL, "--gmm_loss", "corrected"],
    "mixnn-wd": [*GLOBAL, "--weight_decay", "0.001", "--lr_min", "0.001"],
    "mixnn-batchstep": [*GLOBAL, "--knn_scope", "batch", "--batch_knn_mode", "train", "--target_update", "step"],
}


def cpu_launch(ranks: int) -> list[str]:
    """The command prefix that runs a repository script on `ranks` CPU processes: `accelerate launch` with
    launch/accelerate/cpu2.yaml for 2 (`--cpu --num_processes 2` starts one), plain python for 1. Run it
    with ACCELERATE_USE_CPU=true in the environment."""
    if ranks == 1:
        return [sys.executable]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "launch/accelerate/cpu2.yaml")]


def parse_variant(name: str) -> list[str]:
    """Arguments of a variant: a `VARIANTS` key, optionally followed by `+key=value` overrides
    (e.g. `mixnn+ema=0.5+sharpen=0.5`)."""
    base, *extra = name.split("+")
    if base not in VARIANTS:
        raise SystemExit(f"unknown method/variant {base!r}; known: {', '.join(VARIANTS)}")
    args = list(VARIANTS[base])
    for item in extra:
        key, _, value = item.partition("=")
        args += [f"--{key}", value]
    return args


def data_dir(workdir: Path, dataset: str, noise: str, seed: int, val_fraction: float, subset: int = 0) -> Path:
    """The shards folder of one (data set, noise, seed); digits uses the name train/main.py would use."""
    val = f"-val{val_fraction:g}" if val_fraction else ""
    sub = f"-n{subset}" if subset else ""
    return workdir / "shards" / f"{dataset}-{noise.replace(':', '')}-s{seed}{val}{sub}"


def prepare(workdir: Path, dataset: str, noise: str, seed: int, val_fraction: float, subset: int = 0,
            raw: str | None = None) -> Path:
    """Prepare the shards once (digits and the IDX data sets by themselves; CIFAR must be prepared by the user)."""
    out = data_dir(workdir, dataset, noise, seed, val_fraction, subset)
    if (out / "dataset.json").is_file():
        return out
    if dataset not in ("digits", "fashion-mnist", "mnist"):
        raise SystemExit(f"{out} missing: python -m data.prepare {dataset} --root RAW --out {out} "
                         f"--noise {noise} --seed {seed} --val-fraction {val_fraction}")
    cmd = [sys.executable, "-m", "data.prepare", dataset, "--out", str(out), "--seed", str(seed)]
    cmd += ["--noise", noise] if noise != "none" else []
    cmd += ["--val-fraction", str(val_fraction)] if val_fraction else []
    cmd += ["--train-subset", str(subset)] if subset else []
    cmd += ["--root", raw or RAW[dataset]] if dataset != "digits" else []
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if result.returncode:
        raise SystemExit(f"preparing {out} failed:\n{result.stderr[-2000:]}")
    return out


def run_training(name: str, data: Path, dataset: str, method_args: list[str], seed: int, epochs: int, out: Path,
                 reuse: bool, extra: list[str], workdir: Path, threads: int = 1) -> dict:
    """Train one configuration in a subprocess (or reuse a finished run of the same epochs); its results."""
    run = out / name
    if reuse and (run / "final.json").is_file() and json.loads((run / "final.json").read_text())["epochs"] == epochs:
        return read_result(run)
    files = [str(REPO / "launch" / "configs" / f"{CONFIGS[dataset]}.yaml")] if dataset in CONFIGS else []
    if "--config_overlay" in method_args:  # a named method config layered over the data set's config
        i = method_args.index("--config_overlay")
        files.append(str(REPO / "launch" / "configs" / f"{method_args[i + 1]}.yaml"))
        method_args = method_args[:i] + method_args[i + 2:]
    config = ["--config", ",".join(files)] if files else ["--dataset", dataset]
    cmd = [sys.executable, str(REPO / "train" / "main.py"), *config, "--data", str(data),
           "--seed", str(seed), "--epochs", str(epochs), "--output", str(out), "--run_name", name,
           "--progress", "false", *method_args, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=workdir)
    if result.returncode:
        raise RuntimeError(f"{name} failed:\n{result.stderr[-3000:]}")
    return read_result(run)


def read_result(run: Path) -> dict:
    """final.json's last and best records, plus the last value of every diagnostic column of summary.csv."""
    final = json.loads((run / "final.json").read_text())
    out = {**final["last"], "best": final["best"], "seconds": final.get("train_seconds_total")}
    rows = list(csv.DictReader((run / "summary.csv").open()))
    for key in rows[0] if rows else []:
        values = [r[key] for r in rows if r.get(key) not in ("", None)]
        if values and key.startswith(("nn_", "train_acc_given_", "uncertain_", "removed_", "clean_fraction")):
            out[key] = float(values[-1])
    return out


def fmt(values: list, scale: float = 1.0) -> str:
    """mean ± std of the values that exist, or '-'."""
    v = np.array([x for x in values if x is not None], dtype=float) * scale
    return f"{v.mean():.1f} ± {v.std():.1f}" if len(v) else "-"


def mean(values: list) -> float | None:
    v = [x for x in values if x is not None]
    return float(np.mean(v)) if v else None


def add_grid_arguments(p) -> None:
    """Options every grid benchmark takes."""
    p.add_argument("--dataset", default="digits", help="digits | fashion-mnist | mnist (prepared here from the IDX "
                   "files, --raw) | cifar10 | cifar100 (prepared by the user as shards/<dataset>-<noise>-s<seed>-val<F>)")
    p.add_argument("--raw", help="folder of the IDX files (default: Debian's /usr/share/datasets/<dataset>)")
    p.add_argument("--noises", default="symmetric:0.4,symmetric:0.8,pairflip:0.4")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--val-fraction", type=float, default=0.1, help="noisy val split carved out of train")
    p.add_argument("--train-subset", type=int, default=0, help="stratified subset of train (quick studies)")
    p.add_argument("--parallel", type=int, default=2, help="runs at once (each with --threads threads)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reuse", action="store_true", help="keep finished runs (an interrupted grid continues)")
    p.add_argument("--workdir", type=Path, default=Path.cwd())


def parse_grid(p, names_option: str) -> tuple:
    """(args, extra training arguments, noises, method/variant names, seeds) from a grid benchmark's parser."""
    args, extra = p.parse_known_args()
    args.out = args.out.resolve()
    names = getattr(args, names_option).split(",")
    return args, extra, args.noises.split(","), names, [int(s) for s in args.seeds.split(",")]


def per_seed(results: dict, noise: str, name: str, seeds: list[int], key: str) -> list:
    """One result value per seed (None where a run failed or lacks it)."""
    return [(results.get((noise, name, s)) or {}).get(key) for s in seeds]


def best_per_seed(results: dict, noise: str, name: str, seeds: list[int], key: str = "test_top1") -> list:
    """One value per seed of the epoch chosen on the noisy val split."""
    return [((results.get((noise, name, s)) or {}).get("best") or {}).get(key) for s in seeds]


def run_variant(args, extra: list[str], noise: str, variant: str, seed: int) -> dict | None:
    """One grid cell: the variant trained on the (noise, seed) shards, run name `<variant>-<noise>-s<seed>`;
    a failed run is reported and gives None."""
    data = data_dir(args.workdir, args.dataset, noise, seed, args.val_fraction, args.train_subset)
    name = f"{variant}-{noise.replace(':', '')}-s{seed}"
    try:
        return run_training(name, data, args.dataset, parse_variant(variant), seed, args.epochs, args.out,
                            args.reuse, extra, args.workdir, args.threads)
    except RuntimeError as e:
        print(e, file=sys.stderr, flush=True)
        return None


def run_grid(args, noises: list[str], variants: list[str], seeds: list[int], extra: list[str]) -> dict:
    """Every (noise, variant, seed) run, `args.parallel` at a time; {(noise, variant, seed): result}.
    Runs that fail are reported and left out (the table shows '-')."""
    import itertools
    from concurrent.futures import ThreadPoolExecutor

    grid = list(itertools.product(noises, variants, seeds))
    for noise, seed in itertools.product(noises, seeds):  # prepare serially before the runs race for it
        prepare(args.workdir, args.dataset, noise, seed, args.val_fraction, args.train_subset, args.raw)
    if "clean" in variants:
        for seed in seeds:
            prepare(args.workdir, args.dataset, "none", seed, args.val_fraction, args.train_subset, args.raw)

    def one(item):
        noise, variant, seed = item
        return run_variant(args, extra, "none" if variant == "clean" else noise, variant, seed)

    # "clean" trains on the noise-free data: one run per seed, shared by every noise column
    todo = [g for g in grid if g[1] != "clean" or g[0] == noises[0]]
    with ThreadPoolExecutor(args.parallel) as pool:
        done = dict(zip(todo, pool.map(one, todo)))
    return {g: done[g] if g in done else done[(noises[0], g[1], g[2])] for g in grid}
