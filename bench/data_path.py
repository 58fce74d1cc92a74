"""The data path on real-size JPEGs: what each method's reads cost the CPU, and how many cores feed one GPU.

    python bench/data_path.py [--images 800] [--workers 0,2] [--presets clothing1m,webvision] [--reuse]
        [--out runs/bench-data-path]

Images: the two photographs scikit-learn ships (`sklearn.datasets.load_sample_images()`, 427 x 640) cut into
N distinct JPEGs - a random crop of 40-100% of each side (aspect up to 3.6:1), rescaled so the shorter side
is 256-800 px, flipped half the time, brightness / contrast / colour jittered by up to 30%, saved at
quality 75-95 - in 14 class folders, prepared as a user would: `python -m data.prepare folder` (and again
with `--resize 256`).

Per preset (clothing1m: square 256 resize + random 224 crop; webvision: shorter side 256 + random 227 crop),
every cell runs the exact read pattern of one method over the N ids of an epoch through the real loader
(`data.reader.id_loader` over `ShardDataset`, the preset's transforms, batches of 64), with no model:

- `ce`: the training pass (each id once, train transform);
- `mixnn`: MixNN's default, the refresh pass (each id once, eval transform) then the training pass;
- `mixnn-global`: the refresh pass, then each anchor read with its neighbour (k = 1): 2 reads per id;
- `dividemix`: two refresh passes (one per network), then per network each id read in two augmented views;

without and with the epoch cache (data.epoch_cache), with reduced-size decoding as a run does it
(`decode_draft: auto`; CE also without it), each batch leaving the loader as uint8 and normalised by the
step as in a run (`ShardDataset.to_device`; CE also normalised per image in the loader), and beside them,
on the same images as plain files, (a) `ImageFolder`: torchvision's `ImageFolder` + PIL + the same
transforms as a v2 Compose in a DataLoader (CE's pattern: what users of the authors' scripts run), and
(b) the decode-only limits of one core: PIL's full decode, PIL with `draft` (libjpeg's DCT scaling to the
smallest size still at least the preset's resize), and `torchvision.io.decode_jpeg`.

Columns: images delivered per second (all reads), epoch ids per second, both per core (a worker is a core;
0 workers: the main process is the core); JPEG decodes and MB of JPEG read per trained id; CPU cores
needed to feed one GPU at GPU_RATE trained images per second. Results are kept in OUT/results.json
(`--reuse` skips the cells already there).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# NVIDIA DeepLearningExamples, ResNet-50 v1.5 for PyTorch, training performance on 1 x A100 80GB, AMP,
# batch 256: ~2,470 images/s (the published table); the rate the data path must deliver per GPU.
GPU_RATE = 2470
GPU_SOURCE = "NVIDIA DeepLearningExamples ResNet-50 v1.5, 1x A100 80GB, AMP: ~2,470 img/s"
BATCH = 64
CLASSES = 14


def make_images(raw: Path, n: int, seed: int = 0) -> dict:
    """N distinct JPEGs from scikit-learn's two sample photographs (see the module docstring); their sizes."""
    from PIL import Image, ImageEnhance
    from sklearn.datasets import load_sample_images

    done = raw / "sizes.json"
    if done.is_file() and json.loads(done.read_text())["n"] == n:
        return json.loads(done.read_text())
    photos = [Image.fromarray(a) for a in load_sample_images().images]
    rng = np.random.default_rng(seed)
    sides, nbytes = [], []
    for i in range(n):
        photo = photos[i % len(photos)]
        w, h = photo.size
        cw, ch = int(w * rng.uniform(0.4, 1.0)), int(h * rng.uniform(0.4, 1.0))
        left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        img = photo.crop((left, top, left + cw, top + ch))
        short = int(rng.integers(256, 801))
        scale = short / min(img.size)
        img = img.resize((max(1, round(img.size[0] * scale)), max(1, round(img.size[1] * scale))), Image.BICUBIC)
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
            img = enhance(img).enhance(float(rng.uniform(0.7, 1.3)))
        path = raw / f"class{i % CLASSES:02d}" / f"{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, quality=int(rng.integers(75, 96)))
        sides.append(img.size)
        nbytes.append(path.stat().st_size)
    sides = np.array(sides)
    info = {"n": n, "width": pct(sides[:, 0]), "height": pct(sides[:, 1]), "kb": pct(np.array(nbytes) / 1024)}
    done.write_text(json.dumps(info))
    return info


def pct(values: np.ndarray) -> list:
    """[min, median, max] rounded."""
    return [round(float(np.min(values)), 1), round(float(np.median(values)), 1), round(float(np.max(values)), 1)]


def prepare(raw: Path, out: Path, resize: int | None = None) -> Path:
    """`python -m data.prepare folder` as a user runs it (once)."""
    if not (out / "dataset.json").is_file():
        cmd = [sys.executable, "-m", "data.prepare", "folder", "--root", str(raw), "--out", str(out)]
        subprocess.run(cmd + (["--resize", str(resize)] if resize else []), check=True, cwd=REPO,
                       capture_output=True)
    return out


def patterns(n: int, rng: np.random.Generator) -> dict:
    """Each method's epoch as passes: (transform, id batches); ids 0..n-1, batches of BATCH."""
    def shuffled():
        return [b for b in np.array_split(rng.permutation(n), max(1, n // BATCH))]

    ordered = [b for b in np.array_split(np.arange(n), max(1, n // BATCH))]
    with_partner = [np.concatenate([b, rng.permutation(n)[:len(b)]]) for b in shuffled()]
    views = [np.concatenate([b, b]) for b in shuffled()]
    return {"ce": [("train", shuffled())],
            "mixnn": [("eval", ordered), ("train", shuffled())],
            "mixnn-global": [("eval", ordered), ("train", with_partner)],
            "dividemix": [("eval", ordered), ("eval", ordered), ("train", views),
                          ("train", [np.concatenate([b, b]) for b in shuffled()])]}


def open_split(shards: Path, preset_name: str, draft: bool = True, normalise: bool = False):
    """The training split as a run opens it (train and eval views; `draft`: decode_draft auto; uint8 batches
    normalised by `to_device`, or with `normalise` by the transforms in the loader)."""
    from data.reader import ShardDataset
    from data.shards import load_offset_table
    from data.transforms import EvalTransform, TrainTransform, draft_for, get_preset

    preset = get_preset(preset_name)
    train = ShardDataset(shards / "train", TrainTransform(preset=preset, normalise=normalise), preset.mode,
                         table=load_offset_table(shards / "train"))
    train.draft_size = draft_for(preset) if draft else None
    return preset, train, train.with_transform(EvalTransform(preset=preset, normalise=normalise))


def run_pattern(shards: Path, preset_name: str, pattern: str, workers: int, cache: bool, tmp: Path,
                draft: bool = True, normalise: bool = False) -> dict:
    """One cell: the pattern's passes through `id_loader`, each batch as the model's float32 input
    (`to_device`, the training loop's step); seconds, reads, decodes, bytes."""
    import torch

    from data.epoch_cache import EpochCache, slot_bytes
    from data.reader import id_loader
    from data.transforms import ResizeStep

    torch.set_num_threads(1)
    preset, train, plain = open_split(shards, preset_name, draft, normalise)
    n = len(train)
    if cache:
        path = tmp / f"cache-{os.getpid()}"
        store = EpochCache(path, n, slot_bytes(3, preset.resize, preset.square))
        store.unlink()
        store.assign(np.arange(n), n)
        for ds in (train, plain):
            ds.use_epoch_cache(store, ResizeStep(preset=preset))
    passes = patterns(n, np.random.default_rng(0))[pattern]
    reads, decoded, t0 = 0, 0, time.perf_counter()
    for kind, batches in passes:
        ds = train if kind == "train" else plain
        for batch in id_loader(ds, batches, workers, seed=0 if kind == "train" else None):
            ds.to_device(batch["images"], "cpu")
            reads += int(batch["valid"].sum())
            decoded += batch["decoded"]
    seconds = time.perf_counter() - t0
    jpeg_bytes = float(train.size.sum()) * decoded / n
    return {"seconds": seconds, "reads": reads, "ids": n, "decoded": decoded, "jpeg_mb": jpeg_bytes / 2**20}


def run_imagefolder(raw: Path, preset_name: str, workers: int) -> dict:
    """torchvision ImageFolder + PIL + the preset's transforms as a v2 Compose, CE's pattern (one shuffled pass)."""
    import torch
    from torchvision import datasets
    from torchvision.transforms import v2 as T

    from data.transforms import get_preset, resize_size

    torch.set_num_threads(1)
    preset = get_preset(preset_name)
    transform = T.Compose([T.PILToTensor(), T.Resize(resize_size(preset), antialias=True), T.RandomCrop(preset.size),
                           T.RandomHorizontalFlip(), T.ToDtype(torch.float32, scale=True),
                           T.Normalize(preset.mean, preset.std)])
    ds = datasets.ImageFolder(str(raw), transform=transform)
    loader = torch.utils.data.DataLoader(ds, batch_size=BATCH, shuffle=True, num_workers=workers,
                                         generator=torch.Generator().manual_seed(0))
    reads, t0 = 0, time.perf_counter()
    for images, _ in loader:
        reads += len(images)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "reads": reads, "ids": len(ds), "decoded": reads,
            "jpeg_mb": sum(Path(p).stat().st_size for p, _ in ds.samples) / 2**20}


def decode_limits(shards: Path, preset_name: str, count: int = 200) -> dict:
    """Images per second of one core decoding the stored JPEGs: PIL full, PIL draft, torchvision.io."""
    import torch
    from PIL import Image
    from torchvision.io import ImageReadMode, decode_jpeg

    torch.set_num_threads(1)
    preset, train, _ = open_split(shards, preset_name)
    blobs = [train.read_bytes(i) for i in range(min(count, len(train)))]
    out = {}
    t0 = time.perf_counter()
    for b in blobs:
        with Image.open(io.BytesIO(b)) as img:
            img.convert("RGB")
    out["pil"] = len(blobs) / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for b in blobs:
        with Image.open(io.BytesIO(b)) as img:
            img.draft("RGB", (preset.resize, preset.resize))  # the smallest DCT scale keeping both sides >= resize
            img.convert("RGB")
    out["pil_draft"] = len(blobs) / (time.perf_counter() - t0)
    tensors = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
    t0 = time.perf_counter()
    for t in tensors:
        decode_jpeg(t, mode=ImageReadMode.RGB)
    out["torchvision_io"] = len(blobs) / (time.perf_counter() - t0)
    return out


def cell_rows(results: dict, preset: str, workers: list[int]) -> list[str]:
    rows = []
    for key in sorted(k for k in results if k.split("|")[0] == preset and not k.endswith("decode")):
        _, source, name, w = key.split("|")
        r = results[key]
        cores = max(int(w), 1)
        ids_per_core = r["ids"] / r["seconds"] / cores
        rows.append(f"| {name} | {source} | {w} | {r['reads'] / r['seconds'] / cores:,.0f} | {ids_per_core:,.0f} | "
                    f"{r['decoded'] / r['ids']:.2f} | {r['jpeg_mb'] * 1024 / r['ids']:.0f} | "
                    f"{GPU_RATE / ids_per_core:.0f} |")
    return rows


def main(argv=None) -> None:
    from data.epoch_cache import shared_folder

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=800)
    p.add_argument("--workers", default="0,2")
    p.add_argument("--presets", default="clothing1m,webvision")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "bench-data-path")
    p.add_argument("--reuse", action="store_true", help="keep the cells already in OUT/results.json")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    workers = [int(w) for w in args.workers.split(",")]
    info = make_images(args.out / "raw", args.images)
    full = prepare(args.out / "raw", args.out / "shards")
    small = prepare(args.out / "raw", args.out / "shards-256", resize=256)
    saved = args.out / "results.json"
    results = json.loads(saved.read_text()) if args.reuse and saved.is_file() else {}
    tmp = shared_folder()  # where a run puts its epoch cache

    def cell(key, fn, *a):
        if key not in results:
            results[key] = fn(*a)
            saved.write_text(json.dumps(results, indent=1))
            print(key, {k: round(v, 2) if isinstance(v, float) else v for k, v in results[key].items()}, flush=True)

    for preset in args.presets.split(","):
        for source, shards in (("shards", full), ("shards --resize 256", small)):
            cell(f"{preset}|{source}|decode", decode_limits, shards, preset)
            for w in workers:
                cell(f"{preset}|{source}|ce, decode_draft false|{w}", run_pattern, shards, preset, "ce", w, False,
                     tmp, False)
                cell(f"{preset}|{source}|ce, normalised in the loader|{w}", run_pattern, shards, preset, "ce", w,
                     False, tmp, True, True)
                for pattern in ("ce", "mixnn", "mixnn-global", "dividemix"):
                    cell(f"{preset}|{source}|{pattern}|{w}", run_pattern, shards, preset, pattern, w, False, tmp)
                    if pattern != "ce":
                        cell(f"{preset}|{source}|{pattern} + epoch cache|{w}", run_pattern, shards, preset, pattern,
                             w, True, tmp)
        for w in workers:
            cell(f"{preset}|files|ImageFolder + PIL|{w}", run_imagefolder, args.out / "raw", preset, w)

    print(f"\n{info['n']} JPEGs: width {info['width'][0]:.0f}-{info['width'][2]:.0f} (median {info['width'][1]:.0f}), "
          f"height {info['height'][0]:.0f}-{info['height'][2]:.0f} (median {info['height'][1]:.0f}), "
          f"{info['kb'][0]:.0f}-{info['kb'][2]:.0f} KB (median {info['kb'][1]:.0f}); {os.cpu_count()} cores")
    print(f"GPU rate: {GPU_SOURCE}\n")
    for preset in args.presets.split(","):
        print(f"### {preset}\n")
        print("| read pattern | stored as | workers | images/s per core | epoch ids/s per core | JPEG decodes per id "
              "| KB of JPEG decoded per id | cores to feed one GPU |")
        print("|---|---|---|---|---|---|---|---|")
        print("\n".join(cell_rows(results, preset, workers)))
        print("\n| decode only, one core | PIL | PIL draft | torchvision.io.decode_jpeg |\n|---|---|---|---|")
        for source in ("shards", "shards --resize 256"):
            d = results.get(f"{preset}|{source}|decode")
            if d:
                print(f"| {source} | {d['pil']:,.0f} | {d['pil_draft']:,.0f} | {d['torchvision_io']:,.0f} |")
        print()


if __name__ == "__main__":
    main()
