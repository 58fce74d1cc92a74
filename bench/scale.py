"""Scale by simulation: what every per-epoch step costs as the training set grows to a million samples,
and the per-sample tables at full-WebVision shape; prints markdown tables.

    python bench/scale.py [--quick] [--sizes 100000,300000,1000000] [--regimes clothing,full] [--epochs 3]
        [--tables-only] [--tables-n 2400000] [--tables-classes 1000] [--tables-dense-n 600000] [--work DIR]

Training runs (default): N tiny class-structured 8x8 grey images (14 classes like Clothing1M, 40% symmetric
noise) are written into shards by the project's own shard writer (`data.shards.write_split`; cached in
--work), then MixNN trains on 2 CPU ranks (gloo, `launch/accelerate/cpu2.yaml`) with `small_mlp`, warm-up 0,
soft targets from epoch 0, `knn_index: clustered` on a 64-d PCA projection (`knn_dim: 64`; exact search of
the 1024-d embeddings takes ~95 min at 1M; recall against it is measured and printed), no evaluation, a
checkpoint every epoch, in two regimes: `clothing` (Clothing1M: class-balanced 2,000 batches of 64 = 128k
samples an epoch) and `full` (a full pass). Per N: the mean over epochs 1..E-1 (epoch 0 pays start-up) of
each step of the epoch - plan, refresh pass, loss gather by id, GMM, soft-target EMA (and its all-gather),
kNN (clustered, sharded), table CRC check, partner ids, train pass, metrics, checkpoint write - peak RSS per
rank, checkpoint size, and the time of the label report (`python -m train.report`, rerun from the
checkpoint). The growth exponent b of t ~ N^b is fitted over the sizes.

`--tables-only`: the per-epoch table operations of a refresh at full WebVision shape (2.4M samples x 1,000
classes, full pass) on 2 gloo ranks, without images or a model: each rank's refresh output is simulated
(random softmax rows, embeddings not included), then the real functions run - loss gather by id, GMM, EMA of
the soft targets with their all-gather, CRC check, corrected labels and the table metrics, epoch plan,
checkpoint write and read - with `targets_topk: 10` at N = --tables-n and with dense float16 targets at
N = --tables-dense-n (dense 2.4M x 1,000 needs 4.8 GB of targets plus 4.8 GB of refresh output per rank:
more than this 23 GB machine holds for 2 ranks; the dense row is measured at a smaller N and grows linearly).
`--quick` (about 10 minutes): N = 100k, both regimes, 2 epochs; tables-only at 1/8 of the sizes.
"""
from __future__ import annotations

import argparse
import csv
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from common import cpu_launch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

STEPS = (("plan", "time_plan"), ("refresh", "time_refresh"), ("gather", "time_gather"), ("GMM", "time_gmm"),
         ("targets", "time_targets"), ("kNN", "time_knn"), ("CRC", "time_check"), ("partners", "time_partners"),
         ("train pass", "train_seconds"), ("metrics", "time_metrics"), ("checkpoint", "time_checkpoint"))
BOOKKEEPING = ("time_plan", "time_gather", "time_gmm", "time_targets", "time_check", "time_partners",
               "time_metrics", "time_checkpoint")  # the table operations: neither passes nor the search
REGIMES = {"clothing": ["--num_batches", "2000", "--batch_size", "64"],  # 128k samples an epoch
           "full": ["--num_batches", "0", "--batch_size", "256"]}


# ----------------------------------------------------------------------------- synthetic data

def make_data(root: Path, n: int, classes: int = 14, chunk: int = 100_000) -> Path:
    """N 8x8 grey images (class prototype + noise) with 40% symmetric label noise, written into shards of
    100k samples by `data.shards.write_split` (cached: prepared once per N)."""
    from data.noise import apply_noise, noise_summary, parse_noise
    from data.shards import write_manifest, write_split
    from data.sources import Record, encode_png

    out = root / f"synthetic-{n}"
    if (out / "dataset.json").is_file():
        return out
    rng = np.random.default_rng(0)
    prototypes = rng.integers(0, 256, (classes, 8, 8)).astype(np.float32)
    true = rng.integers(0, classes, n)
    given = apply_noise(true, classes, parse_noise("symmetric:0.4"), seed=0)
    records = []
    for start in range(0, n, chunk):  # images are drawn and encoded a chunk at a time
        t = true[start:start + chunk]
        pixels = np.clip(0.6 * prototypes[t] + rng.normal(40, 40, (len(t), 8, 8)), 0, 255).astype(np.uint8)
        records += [Record(f"img{start + i:08d}", int(given[start + i]), int(t[i]), image=encode_png(pixels[i]))
                    for i in range(len(t))]
    entry = write_split(records, out / "train", workers=2, maxcount=chunk)
    write_manifest(out, "synthetic", [f"class{c}" for c in range(classes)], {"train": entry},
                   {"noise": {"spec": "symmetric:0.4", **noise_summary(true, given, classes)}})
    return out


# ----------------------------------------------------------------------------- training runs

def train_run(data: Path, regime: str, epochs: int, out: Path, reuse: bool, knn: list[str]) -> Path:
    """MixNN on 2 CPU ranks; returns the run folder (kept and reused with --reuse)."""
    run = out / f"{data.name}-{regime}"
    if reuse and (run / "final.json").is_file():
        return run
    cmd = [*cpu_launch(2), str(REPO / "train/main.py"), "--dataset", "digits",
           "--data", str(data), "--model", "small_mlp", "--method", "mixnn", *knn,
           "--epochs", str(epochs), "--warmup_epochs", "0", "--correction_epoch", "0", "--eval_splits", "",
           "--progress", "false", "--output", str(out), "--run_name", run.name, *REGIMES[regime]]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if result.returncode:
        raise RuntimeError(f"{run.name} failed:\n{result.stderr[-3000:]}")
    return run


def report_seconds(run: Path) -> float:
    """Wall time of the label report rebuilt from the last checkpoint (labels.csv, summary, figures)."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "train.report", "--run", str(run)], check=True, cwd=REPO,
                   capture_output=True)
    return time.perf_counter() - t0


def epoch_means(run: Path) -> dict:
    """Mean of every numeric summary.csv column over epochs 1..E-1 (all epochs when there is only one)."""
    rows = list(csv.DictReader((run / "summary.csv").open()))
    rows = rows[1:] or rows
    out = {}
    for key in rows[0]:
        values = [float(r[key]) for r in rows if r.get(key) not in ("", None)]
        if values:
            out[key] = float(np.mean(values))
    return out


def growth(sizes: list[int], values: list[float]) -> str:
    """Exponent b of t ~ N^b, least squares in log-log (needs two sizes and positive times)."""
    pts = [(n, v) for n, v in zip(sizes, values) if v > 1e-4]
    if len(pts) < 2:
        return "-"
    return f"{np.polyfit(np.log([p[0] for p in pts]), np.log([p[1] for p in pts]), 1)[0]:.2f}"


def training_tables(sizes: list[int], regimes: list[str], epochs: int, work: Path, reuse: bool, knn: list[str]) -> None:
    for regime in regimes:
        rows = []
        for n in sizes:
            t0 = time.perf_counter()
            data = make_data(work / "data", n)
            prepared = time.perf_counter() - t0
            run = train_run(data, regime, epochs, work / "runs", reuse, knn)
            means = epoch_means(run)
            ckpt = max((run / "checkpoints").glob("epoch-*.pt"))
            rows.append({"n": n, **means, "checkpoint_mb": ckpt.stat().st_size / 2**20,
                         "report_s": report_seconds(run), "prepare_s": prepared})
            print(f"(N={n} {regime}: shards {'reused' if prepared < 1 else f'written in {prepared:.0f} s'}, "
                  f"run {run})", file=sys.stderr, flush=True)
        print(f"\n### Regime `{regime}` (MixNN, 2 CPU ranks, small_mlp on 8x8 (1024-d embeddings), kNN "
              f"`{' '.join(knn)}`; seconds per epoch, mean of epochs 1..{epochs - 1})\n")
        print("| step | " + " | ".join(f"N={r['n']:,}" for r in rows) + " | growth b (t ~ N^b) |")
        print("|---|" + "---|" * (len(rows) + 1))
        for label, key in STEPS + (("**table operations** (all but passes and kNN)", "bookkeeping"),
                                   ("epoch (all but eval)", "epoch_seconds")):
            if key == "bookkeeping":
                values = [sum(r.get(k, 0.0) for k in BOOKKEEPING) for r in rows]
            else:
                values = [r.get(key, 0.0) for r in rows]
            print(f"| {label} | " + " | ".join(f"{v:.3f}" for v in values) + f" | {growth([r['n'] for r in rows], values)} |")
        for label, key, f in (("peak RSS per rank (MB)", "peak_rss_mb_per_rank", "{:.0f}"),
                              ("checkpoint size (MB)", "checkpoint_mb", "{:.1f}"),
                              ("label report (s, from the checkpoint)", "report_s", "{:.1f}"),
                              ("train images/s", "images_per_second", "{:.0f}"),
                              ("kNN recall@1 vs exact full-dimension search", "knn_recall_at_1", "{:.3f}")):
            print(f"| {label} | " + " | ".join(f.format(r.get(key, 0.0)) for r in rows) + " | |")
        sys.stdout.flush()


# ----------------------------------------------------------------------------- tables only

def tables_worker(rank: int, world: int, port: int, n: int, classes: int, topk: int, out: Path, queue) -> None:
    """One rank of the tables-only simulation: every per-epoch table operation of a refresh, timed."""
    import torch
    import torch.distributed as dist

    from data.plan import build_epoch_plan
    from train.checkpoint import atomic_save, load_checkpoint
    from train.config import CONFIG_DIR, load_config
    from train.methods import Tables
    from train.targets import SoftTargets
    from train.loop import RefreshStats
    from train.tables import (check_tables_identical, fit_clean, gather_losses, table_metrics,
                              target_rows, update_targets, windowed_losses)

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    rng = np.random.default_rng(rank)
    labels = np.random.default_rng(0).integers(0, classes, n)
    true = np.where(np.random.default_rng(1).random(n) < 0.4, np.random.default_rng(2).integers(0, classes, n), labels)
    cfg = load_config(["--config", str(CONFIG_DIR / "mixnn_global.yaml"), "--targets_topk", str(topk),
                       "--correction_epoch", "0", "--ema", "0.9"])  # MixNN with the global search

    class Train:  # what table_metrics reads of a ShardDataset
        def __len__(self):
            return n
    train = Train()
    train.labels, train.true_labels = labels, true
    timings = {}

    def timed(name, fn, *args):
        dist.barrier()
        t0 = time.perf_counter()
        result = fn(*args)
        dist.barrier()
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - t0
        return result

    tables = Tables(SoftTargets(labels, classes, topk))
    for epoch in range(2):  # epoch 0 warms up allocations; epoch 1 is reported
        timings.clear()
        plan = timed("plan", lambda: build_epoch_plan(labels, seed=0, epoch=epoch, batch_size=256, world_size=world))
        ids = plan.refresh_slice(rank)
        probs = np.empty((len(ids), classes), np.float32)  # the refresh pass's output, made batch by batch
        for start in range(0, len(ids), 65536):
            part = rng.standard_normal((min(65536, len(ids) - start), classes), dtype=np.float32)
            part[np.arange(len(part)), true[ids[start:start + len(part)]]] += 4.0
            np.exp(part - part.max(1, keepdims=True), out=part)
            probs[start:start + len(part)] = part / part.sum(1, keepdims=True)
        stats = RefreshStats(ids, probs, np.zeros((len(ids), 0), np.float32))
        del probs
        losses = timed("gather", gather_losses, stats, labels)
        tables.loss_history, losses = timed("window", windowed_losses, tables.loss_history, losses, cfg.gmm_loss_window)
        tables.clean, _ = timed("GMM", fit_clean, losses, epoch, rank == 0)
        timed("targets", lambda: update_targets(tables, stats, target_rows(cfg, stats, labels, tables.clean), cfg.ema))
        del stats
        timed("CRC", check_tables_identical, tables)
        timed("metrics", table_metrics, train, tables, plan.unique_ids)
        state = {"targets": tables.targets.state_dict(), "clean": torch.from_numpy(tables.clean),
                 "loss_history": torch.from_numpy(tables.loss_history)}
        path = out / f"tables-{n}-{classes}-{topk}.pt"
        if rank == 0:
            t0 = time.perf_counter()
            atomic_save(state, path)
            timings["checkpoint write"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            load_checkpoint(path)
            timings["checkpoint read"] = time.perf_counter() - t0
        dist.barrier()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if rank == 0:
        timings["checkpoint MB"] = path.stat().st_size / 2**20
        path.unlink()
    queue.put((rank, timings, rss))
    dist.destroy_process_group()


def tables_only(configs: list[tuple[int, int, int]], out: Path) -> None:
    import torch.multiprocessing as mp

    out.mkdir(parents=True, exist_ok=True)
    results = []
    for n, classes, topk in configs:
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        port = 29500 + int(time.time()) % 1000
        procs = [ctx.Process(target=tables_worker, args=(r, 2, port, n, classes, topk, out, queue)) for r in range(2)]
        for p in procs:
            p.start()
        got = []
        while len(got) < len(procs):  # a rank that dies (e.g. out of memory) must not hang the benchmark
            try:
                got.append(queue.get(timeout=5))
            except Exception:
                if any(p.exitcode not in (None, 0) for p in procs):
                    for p in procs:
                        p.kill()
                    raise SystemExit(f"tables-only N={n} C={classes} topk={topk}: a rank failed "
                                     f"(exit codes {[p.exitcode for p in procs]})")
        for p in procs:
            p.join()
        timings = next(t for r, t, _ in got if r == 0)
        results.append((n, classes, topk, timings, max(rss for _, _, rss in got)))
        print(f"(tables-only N={n} C={classes} topk={topk} done)", file=sys.stderr, flush=True)
    names = ["plan", "gather", "window", "GMM", "targets", "CRC", "metrics"]
    print("\n### Tables only, full-WebVision shape, 2 gloo ranks (seconds per epoch; full pass, every sample "
          "refreshed)\n")
    print("| N | classes | targets | " + " | ".join(names) + " | **epoch total** | checkpoint write | read | "
          "checkpoint MB | peak RSS per rank (MB) |")
    print("|---|---|---|" + "---|" * (len(names) + 5))
    for n, classes, topk, t, rss in results:
        total = sum(t[k] for k in names)
        print(f"| {n:,} | {classes} | {'top-' + str(topk) if topk else 'dense fp16'} | "
              + " | ".join(f"{t[k]:.2f}" for k in names)
              + f" | **{total:.2f}** | {t['checkpoint write']:.2f} | {t['checkpoint read']:.2f} | "
              f"{t['checkpoint MB']:.0f} | {rss:.0f} |")
    sys.stdout.flush()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="N = 100k, 2 epochs; tables-only at 1/8 size (~10 min)")
    p.add_argument("--sizes", default="100000,300000,1000000")
    p.add_argument("--regimes", default="clothing,full")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--knn-index", default="clustered", help="knn_index of the training runs")
    p.add_argument("--knn-dim", type=int, default=64, help="knn_dim of the training runs (0: full 1024-d)")
    p.add_argument("--recall-queries", type=int, default=1000)
    p.add_argument("--tables-only", action="store_true", help="only the full-WebVision tables simulation")
    p.add_argument("--no-tables", action="store_true", help="skip the tables-only simulation")
    p.add_argument("--tables-n", type=int, default=2_400_000)
    p.add_argument("--tables-classes", type=int, default=1000)
    p.add_argument("--tables-dense-n", type=int, default=600_000)
    p.add_argument("--reuse", action="store_true", help="keep finished training runs (shards are always kept)")
    p.add_argument("--work", type=Path, default=Path("runs/bench-scale"))
    args = p.parse_args()
    work = args.work.resolve()
    sizes = [100_000] if args.quick else [int(s) for s in args.sizes.split(",")]
    epochs = 2 if args.quick else args.epochs
    shrink = 8 if args.quick else 1
    if not args.tables_only:
        knn = ["--knn_index", args.knn_index, "--knn_dim", str(args.knn_dim), "--recall_queries",
               str(args.recall_queries)]
        training_tables(sizes, args.regimes.split(","), epochs, work, args.reuse, knn)
    if not args.no_tables:
        tables_only([(args.tables_n // shrink, args.tables_classes, 10),
                     (args.tables_dense_n // shrink, args.tables_classes, 0)], work / "tables")


if __name__ == "__main__":
    main()
