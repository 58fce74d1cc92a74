"""Acceptance check of one machine with a CUDA GPU, in under 10 minutes: one table of what the GPU can train
and whether the data path keeps up. Run through `bash bench/gpu_check.sh` (same arguments).

    bash bench/gpu_check.sh [--out runs/gpu-check] [--images 2000] [--steps 200]

Rows: the GPU's own training rate on synthetic tensors (ResNet-50 at 224 and InceptionResNetV2 at 227, bf16
autocast, channels_last, SGD; the rate the data path must meet); the data path's rate on real-size JPEG
shards (bench/data_path.py's images) with every core as a DataLoader worker, for CE's and MixNN's reads;
batched CUDA JPEG decoding (`torchvision.io.decode_jpeg` on a list, nvjpeg); `torch_knn` (index/knn.py) on
CUDA at 128k x 2048; and short MixNN and DivideMix runs (clothing1m preset, `--steps` steps of ResNet-50
from scratch) with their epoch time split and the training pass's share spent waiting for data.

Without CUDA it runs the rows that do not need it, small (`--images 64 --steps 4`, small_cnn), and says which
it skipped: that is how CI runs it.
"""
from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def model_rate(name: str, size: int, batch: int, steps: int) -> float:
    """Training images per second of a timm model on synthetic tensors (CUDA, bf16 autocast, channels_last)."""
    import timm
    import torch

    model = timm.create_model(name, pretrained=False, num_classes=1000).cuda().to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(batch, 3, size, size, device="cuda").to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device="cuda")
    for i in range(steps + 5):
        if i == 5:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - t0)


def cuda_decode_rate(shards: Path, count: int = 256) -> float:
    """JPEGs per second decoded on the GPU in one batched `decode_jpeg` call (nvjpeg), bytes already in memory."""
    import torch
    from torchvision.io import decode_jpeg

    from data.reader import ShardDataset

    ds = ShardDataset(shards / "train")
    blobs = [torch.frombuffer(bytearray(ds.read_bytes(i % len(ds))), dtype=torch.uint8) for i in range(count)]
    decode_jpeg(blobs[:8], device="cuda")
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    decode_jpeg(blobs, device="cuda")
    torch.cuda.synchronize()
    return count / (time.perf_counter() - t0)


def knn_seconds(n: int = 131072, d: int = 2048) -> float:
    """Seconds of an exact 1-NN search of n x d float32 embeddings against themselves with torch_knn on CUDA."""
    import numpy as np
    import torch

    from index.knn import torch_knn

    x = np.random.default_rng(0).standard_normal((n, d), dtype=np.float32)
    torch_knn(x[:1024], x, 1, "l2", torch.device("cuda"))
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    torch_knn(x, x, 2, "l2", torch.device("cuda"))
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def training_run(method: str, shards: Path, out: Path, steps: int, model: str) -> dict:
    """A short run of `method` on the JPEG shards (clothing1m preset): the last epoch's time split."""
    name = f"{method}-{model}"
    args = [sys.executable, str(REPO / "train/main.py"), "--method", method, "--dataset", "clothing1m", "--data",
            str(shards), "--model", model, "--pretrained", "none", "--epochs", "2", "--warmup_epochs", "1",
            "--correction_epoch", "1", "--num_batches", str(steps),
            "--batch_size", "64" if model != "small_cnn" else "8",
            "--workers", str(max(1, (os.cpu_count() or 2) - 1)), "--eval_splits", "train", "--output", str(out),
            "--run_name", name, "--progress", "false", "--memorisation_every", "0", "--cache_images", "false"]
    if model == "small_cnn":
        args += ["--image_size", "32"]
    result = subprocess.run(args, cwd=REPO, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if result.returncode:
        return {"error": (result.stderr or result.stdout).strip().splitlines()[-1]}
    row = list(csv.DictReader((out / name / "summary.csv").open()))[-1]
    get = lambda k: float(row[k]) if row.get(k) not in (None, "") else 0.0
    return {"epoch_seconds": get("epoch_seconds"), "refresh": get("time_refresh"), "train": get("train_seconds"),
            "wait": get("data_wait_seconds"), "images_per_second": get("images_per_second"),
            "decodes": get("decodes_per_trained_image")}


def main(argv=None) -> None:
    import torch

    from data.epoch_cache import shared_folder
    from data_path import make_images, prepare, run_pattern

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "runs" / "gpu-check")
    p.add_argument("--images", type=int, default=0, help="real-size JPEGs (0: 2000 with CUDA, 64 without)")
    p.add_argument("--steps", type=int, default=0, help="steps of the MixNN / DivideMix runs (0: 200 / 4)")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    images, steps = args.images or (2000 if cuda else 64), args.steps or (200 if cuda else 4)
    args.out.mkdir(parents=True, exist_ok=True)
    make_images(args.out / "raw", images)
    shards = prepare(args.out / "raw", args.out / "shards")
    cores = os.cpu_count() or 1
    device = torch.cuda.get_device_name(0) if cuda else "no CUDA device"
    rows, skipped = [], []

    def row(what, value, note=""):
        rows.append(f"| {what} | {value} | {note} |")

    if cuda:
        row("ResNet-50 train, 224, bf16, channels_last, batch 128",
            f"{model_rate('resnet50', 224, 128, 30):,.0f} img/s")
        row("InceptionResNetV2 train, 227, bf16, channels_last, batch 64",
            f"{model_rate('inception_resnet_v2', 227, 64, 20):,.0f} img/s")
    else:
        skipped += ["GPU training rates", "batched CUDA decode", "torch_knn on CUDA"]
    workers = max(1, cores - 1)
    tmp = shared_folder()  # where a run puts its epoch cache
    for pattern, cache in (("ce", False), ("mixnn", False), ("mixnn", True)):
        r = run_pattern(shards, "clothing1m", pattern, workers, cache, tmp)
        row(f"data path, {pattern}{' + epoch cache' if cache else ''}, {workers} workers, {images} JPEGs",
            f"{r['ids'] / r['seconds']:,.0f} trained img/s", f"{r['decoded'] / r['ids']:.2f} decodes per image")
    if cuda:
        row("batched CUDA decode_jpeg, 256 JPEGs", f"{cuda_decode_rate(shards):,.0f} img/s")
        row("torch_knn on CUDA, 128k x 2048, k = 2", f"{knn_seconds():.2f} s")
    model = "resnet50" if cuda else "small_cnn"
    for method in ("mixnn", "dividemix"):
        r = training_run(method, shards, args.out / "runs", steps, model)
        if "error" in r:
            row(f"{method}, clothing1m preset, {steps} steps, {model}", "failed", r["error"])
            continue
        share = r["wait"] / r["train"] if r["train"] else 0.0
        row(f"{method}, clothing1m preset, {steps} steps, {model}", f"{r['epoch_seconds']:.1f} s epoch",
            f"refresh {r['refresh']:.1f} s, train pass {r['train']:.1f} s ({share:.0%} waiting for data), "
            f"{r['images_per_second']:,.0f} img/s, {r['decodes']:.2f} decodes per trained image")
    print(f"\n{time.strftime('%Y-%m-%d')}, {device}, {cores} CPU cores, torch {torch.__version__}\n")
    print("| check | result | notes |\n|---|---|---|")
    print("\n".join(rows))
    if skipped:
        print(f"\nskipped (no CUDA device): {', '.join(skipped)}")


if __name__ == "__main__":
    main()
