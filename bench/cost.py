"""What a method costs per epoch, and how fast the data path reads; prints markdown tables.

    python bench/cost.py [--sizes digits,synthetic] [--ranks 1,2] [--epochs 3] [--synthetic-n 4000]
        [--methods ce,mixnn,mixnn-refresh2,selectmix] [--repeats 1] [--train-args "--channels_last true"] [--no-throughput]

Per configuration (same data, model and number of steps for every method): the mean over epochs 1..E-1
(epoch 0 pays start-up) of the epoch time and its split - refresh pass / GMM / soft targets / kNN
(gather and broadcast included) / other (epoch plan, partner ids, table checks, metrics) / train pass,
of which waiting for data - images per second of the train pass, peak resident memory per rank, and
the ratio of the epoch time to CE's. MixNN runs with warm-up 0 so every epoch pays the refresh
(`mixnn-refresh2`: every 2nd epoch); SelectMix's timed epochs are its training stage (its
cross-validation stage runs first, here 2 folds x 1 epoch). `synthetic` is a generated set of 64x64
JPEGs (10 classes, 40% symmetric noise) written to shards, trained with timm's resnet10t.

Then the data path: samples/s of read-by-id (`data.reader.ShardDataset`, random order across all
shards, decode + train transform; then from the decoded-image cache) with 0 and 2 DataLoader workers,
against sequential WebDataset streaming of the same shards with the same decode and transform.
"""
from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from common import cpu_launch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SPLIT = ("time_refresh", "time_gather", "time_gmm", "time_targets", "time_knn", "train_seconds")


def make_synthetic(root: Path, n: int) -> Path:
    """n 64x64 JPEGs in 10 class folders, prepared into shards with 40% symmetric noise (cached)."""
    from PIL import Image

    shards = root / "shards"
    if (shards / "dataset.json").is_file():
        return shards
    rng = np.random.default_rng(0)
    for i in range(n):
        c = i % 10
        img = rng.integers(0, 80, (64, 64, 3), dtype=np.uint8)
        img[:, :, c % 3] += np.uint8(60 + 15 * c)  # a class-dependent colour cast
        folder = root / "raw" / f"class{c}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f"{i:06d}.jpg", quality=90)
    subprocess.run([sys.executable, "-m", "data.prepare", "folder", "--root", str(root / "raw"), "--out",
                    str(shards), "--noise", "symmetric:0.4", "--shard-size", "500"], check=True, cwd=REPO,
                   capture_output=True)
    return shards


def train_args(size: str, work: Path, n: int) -> list[str]:
    if size == "digits":
        subprocess.run([sys.executable, "-m", "data.prepare", "digits", "--out", str(work / "digits"), "--noise",
                        "symmetric:0.4"], check=True, cwd=REPO, capture_output=True)
        return ["--data", str(work / "digits"), "--eval_splits", "test"]
    shards = make_synthetic(work / "synthetic", n)
    return ["--data", str(shards), "--dataset", "synthetic", "--image_size", "64", "--model", "resnet10t",
            "--eval_splits", "", "--batch_size", "64"]


METHOD_ARGS = {"selectmix": ["--method", "selectmix", "--cv_folds", "2", "--cv_epochs", "1"],  # short CV stage, untimed
               "mixnn-refresh2": ["--method", "mixnn", "--refresh_every", "2"]}  # tables refreshed every 2nd epoch


def run(method: str, ranks: int, args: list[str], epochs: int, out: Path) -> list[dict]:
    name = f"{method}-{ranks}-{int(time.time() * 1000) % 10**8}"
    cmd = [*cpu_launch(ranks), str(REPO / "train/main.py"), *args, "--epochs", str(epochs),
           "--warmup_epochs", "0", "--correction_epoch", "0", "--eval_every", "1000", "--progress", "false",
           "--output", str(out), "--run_name", name, *METHOD_ARGS.get(method, ["--method", method])]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if result.returncode:
        raise RuntimeError(result.stderr[-3000:])
    return list(csv.DictReader((out / name / "summary.csv").open()))[1:]


def mean(rows: list[dict], key: str, missing: float | None = None) -> float:
    """Mean of a column over epochs; an epoch without the value counts as `missing` (None: skipped)."""
    values = [float(r[key]) if r.get(key) not in (None, "") else missing for r in rows]
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else 0.0


def cost_table(sizes, ranks_list, methods, epochs, n, work: Path, repeats: int = 1, extra=()) -> None:
    """Runs every method `repeats` times, interleaved (method order rotates per round) so that slow spells
    of the machine spread over all methods; rows pool the epochs of all runs, and "epoch s" shows the
    spread of the per-run means (± std over runs)."""
    print("| data | ranks | method | epoch s | refresh | GMM | targets | kNN | other | train (data wait) | img/s | "
          "peak MB/rank | x CE |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for size in sizes:
        args = [*train_args(size, work, n), *extra]  # extra: --train-args, for every run
        for ranks in ranks_list:
            runs = {m: [] for m in methods}
            for r in range(repeats):
                for method in methods[r % len(methods):] + methods[:r % len(methods)]:
                    runs[method].append(run(method, ranks, args, epochs, work / "runs"))
            base = None
            for method in methods:
                rows = [row for one in runs[method] for row in one]
                parts = {k: mean(rows, k, missing=0.0) for k in SPLIT}  # epochs without a refresh pay 0
                total = mean(rows, "epoch_seconds")
                spread = np.std([mean(one, "epoch_seconds") for one in runs[method]])
                other = total - sum(parts.values())  # plan, partner ids, table checks, metrics
                base = base or total
                print(f"| {size} | {ranks} | {method} | {total:.2f} ± {spread:.2f} | {parts['time_refresh']:.2f} | "
                      f"{parts['time_gather'] + parts['time_gmm']:.3f} | {parts['time_targets']:.3f} | {parts['time_knn']:.3f} | {other:.3f} | "
                      f"{parts['train_seconds']:.2f} ({mean(rows, 'data_wait_seconds'):.2f}) | "
                      f"{mean(rows, 'images_per_second'):.0f} | {mean(rows, 'peak_rss_mb_per_rank'):.0f} | "
                      f"{total / base:.2f} |", flush=True)


def throughput_table(shards: Path, seconds: float = 10.0) -> None:
    import torch
    import webdataset as wds

    from data.reader import ShardDataset, id_loader
    from data.transforms import TrainTransform, get_preset

    transform = TrainTransform(preset=get_preset("synthetic", 64))
    ds = ShardDataset(shards / "train", transform)
    order = np.random.default_rng(0).permutation(len(ds))
    print("\n| data path | workers | samples/s |\n|---|---|---|")
    for workers in (0, 2):
        loader = id_loader(ds, [order[i:i + 64] for i in range(0, len(order), 64)], workers)
        print(f"| read by id, random order over {len(ds.shard_paths)} shards | {workers} | "
              f"{rate(loader, seconds):.0f} |", flush=True)
    cached = ds.with_transform(transform)  # same tables, its own cache
    cached.cache_decoded(1 << 30)
    for workers in (0, 2):
        loader = id_loader(cached, [order[i:i + 64] for i in range(0, len(order), 64)], workers)
        print(f"| read by id, decoded-image cache (`cache_images`) | {workers} | {rate(loader, seconds):.0f} |",
              flush=True)
    urls = [str(p) for p in sorted((shards / "train").glob("shard-*.tar"))]
    for workers in (0, 2):
        stream = (wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("pil")
                  .to_tuple("jpg", "cls").map_tuple(lambda im: transform(im.convert("RGB")), int).batched(64))
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers)
        print(f"| WebDataset sequential streaming | {workers} | {rate(loader, seconds):.0f} |", flush=True)


def rate(loader, seconds: float) -> float:
    count, t0 = 0, time.perf_counter()
    for batch in loader:
        count += len(batch["ids"]) if isinstance(batch, dict) else len(batch[0])
        if time.perf_counter() - t0 > seconds:
            break
    return count / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="digits,synthetic")
    p.add_argument("--ranks", default="1,2")
    p.add_argument("--methods", default="ce,mixnn,mixnn-refresh2,selectmix")
    p.add_argument("--repeats", type=int, default=1, help="runs per method, interleaved")
    p.add_argument("--train-args", default="", help='extra train/main.py options for every run, e.g. "--channels_last true"')
    p.add_argument("--throughput", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--synthetic-n", type=int, default=4000)
    p.add_argument("--work", type=Path, default=Path("runs/bench-cost"))
    args = p.parse_args()
    args.work = args.work.resolve()
    cost_table(args.sizes.split(","), [int(r) for r in args.ranks.split(",")], args.methods.split(","), args.epochs,
               args.synthetic_n, args.work, args.repeats, args.train_args.split())
    if args.throughput:
        throughput_table(make_synthetic(args.work / "synthetic", args.synthetic_n))


if __name__ == "__main__":
    main()
