"""Builders of miniature data sets in the real on-disk layouts (docs/data.md describes them) and shared fixtures."""
from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def jpeg_bytes(seed: int, size=(12, 10)) -> bytes:
    """A tiny real JPEG whose content depends on `seed`."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def write_jpeg(path: Path, seed: int, size=(12, 10)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(jpeg_bytes(seed, size))


def write_corrupt(path: Path) -> None:
    """A JPEG cut short: the header parses, decoding fails."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(jpeg_bytes(999)[:60])


def write_lines(path: Path, lines, crlf=False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(("\r\n" if crlf else "\n").join(lines).encode() + b"\n")


def make_clothing1m(root: Path, annotations_subdir=False, images_level=True) -> dict:
    """Clothing1M tree: 14 classes, noisy train (one key with a comma, one corrupt, one missing), val, test."""
    ann = root / "annotations" if annotations_subdir else root
    write_lines(ann / "category_names_eng.txt", [f"class{c}" for c in range(14)], crlf=True)
    prefix = root / "images" if images_level else root
    train, val, test = [], [], []
    for i in range(30):
        key = f"images/{i % 10}/{i:02d}/{1000 + i},{2000 + i}.jpg" if i == 3 else f"images/{i % 10}/{i:02d}/{1000 + i}.jpg"
        train.append((key, i % 14))
    noisy_kv = [f"{k} {c}" for k, c in train]
    clean_keys = {train[0][0]: 5, train[1][0]: train[1][1]}  # train overlap: one wrong, one right
    for i in range(6):
        val.append((f"images/0/v/{5000 + i}.jpg", i % 14))
        test.append((f"images/1/t/{6000 + i}.jpg", (i + 3) % 14))
    clean_kv = [f"{k} {c}" for k, c in list(clean_keys.items()) + val + test]
    write_lines(ann / "noisy_label_kv.txt", noisy_kv + ["images/9/99/extra.jpg 2"], crlf=True)
    write_lines(ann / "clean_label_kv.txt", clean_kv, crlf=True)
    write_lines(ann / "noisy_train_key_list.txt", [k for k, _ in train], crlf=True)
    write_lines(ann / "clean_train_key_list.txt", list(clean_keys), crlf=True)
    write_lines(ann / "clean_val_key_list.txt", [k for k, _ in val], crlf=True)
    write_lines(ann / "clean_test_key_list.txt", [k for k, _ in test], crlf=True)
    for n, (key, _) in enumerate(train + val + test):
        path = prefix / key[len("images/"):]
        if key == train[7][0]:
            write_corrupt(path)
        elif key == train[8][0]:
            continue  # missing file
        else:
            write_jpeg(path, n)
    return {"train": train, "val": val, "test": test, "clean_train": clean_keys,
            "corrupt": train[7][0], "missing": train[8][0]}


def make_webvision(root: Path, classes=60) -> dict:
    """WebVision tree with `classes` synsets, Google + Flickr train lists and a val list."""
    write_lines(root / "info" / "synsets.txt", [f"n{1440764 + c:08d} thing{c}, other{c}" for c in range(classes)])
    google = [(f"google/q{c + 1:04d}/g{c}_{j}.jpg", c) for c in range(classes) for j in range(2)]
    flickr = [(f"flickr/q{c + 1:04d}/f{c}.jpg", c) for c in range(0, classes, 7)]
    val = [(f"val{c + 1:06d}.jpg", c) for c in range(classes)]
    write_lines(root / "info" / "train_filelist_google.txt", [f"{p} {c}" for p, c in google])
    write_lines(root / "info" / "train_filelist_flickr.txt", [f"{p} {c}" for p, c in flickr])
    write_lines(root / "info" / "val_filelist.txt", [f"{p} {c}" for p, c in val])
    for n, (p, _) in enumerate(google + flickr):
        write_jpeg(root / p, n)
    for n, (p, _) in enumerate(val):
        write_jpeg(root / "val_images_256" / p, 500 + n)
    return {"google": google, "flickr": flickr, "val": val}


def cifar_batch(n, num_classes, seed, fine=False):
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 255, (n, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.permutation(np.arange(n) % num_classes)]  # every class present
    if fine:
        return {b"data": data, b"fine_labels": labels, b"coarse_labels": [c // 5 for c in labels]}
    return {b"data": data, b"labels": labels}


def make_cifar10(root: Path) -> None:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for i in range(1, 6):
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(cifar_batch(8, 10, i), protocol=2))
    (folder / "test_batch").write_bytes(pickle.dumps(cifar_batch(5, 10, 9), protocol=2))
    names = [n.encode() for n in "airplane automobile bird cat deer dog frog horse ship truck".split()]
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}, protocol=2))


def make_cifar100(root: Path) -> None:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    (folder / "train").write_bytes(pickle.dumps(cifar_batch(400, 100, 1, fine=True), protocol=2))
    (folder / "test").write_bytes(pickle.dumps(cifar_batch(20, 100, 2, fine=True), protocol=2))
    (folder / "meta").write_bytes(pickle.dumps({b"fine_label_names": [f"c{i}".encode() for i in range(100)]}))


def accelerate_cmd(script: str, *args, processes: int = 2) -> list[str]:
    """`accelerate launch` of a repository script on CPU: 2 gloo ranks (launch/accelerate/cpu2.yaml) or 1."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if processes == 2:
        cmd += ["--config_file", str(REPO / "launch" / "accelerate" / "cpu2.yaml")]
    else:
        cmd += ["--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    return [*cmd, str(REPO / script), *map(str, args)]


def cpu_env() -> dict:
    """The environment of a CPU launch: Accelerate on CPU, one OpenMP thread per rank."""
    return {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}


def run_module(*args, env=None, cwd=REPO, timeout=600) -> subprocess.CompletedProcess:
    """Run `python -m ...` in a subprocess, capturing output."""
    return subprocess.run([sys.executable, "-m", *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory) -> Path:
    """The built-in digits set as the default run prepares it: 40% symmetric noise, a 10% noisy val split
    (1294 train / 143 val / 360 test), prepared once per test session."""
    from data.prepare import build_parser, prepare

    out = tmp_path_factory.mktemp("digits")
    prepare(build_parser().parse_args(["digits", "--out", str(out), "--noise", "symmetric:0.4", "--val-fraction",
                                       "0.1"]))
    return out


def _distributed_child(rank, world_size, store_path, fn, args, queue):
    import faulthandler

    import torch.distributed as dist

    faulthandler.enable()  # a rank that crashes in native code (FAISS, BLAS) prints where, to the test's output

    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world_size)
    try:
        queue.put((rank, fn(rank, *args)))
    except BaseException as e:  # report, so the parent fails with the child's reason
        queue.put((rank, e))
        raise
    finally:
        dist.destroy_process_group()


def run_distributed(fn, world_size, *args, tmp_path, timeout=300):
    """Run `fn(rank, *args)` on `world_size` spawned CPU ranks over gloo; the results in rank order.

    Spawned, not forked: a child forked after FAISS/OpenMP started its thread pool deadlocks. Every call
    rendezvous through a brand-new store file (torch: a file reused from an earlier group "can often cause
    deadlocks"; a test that called this twice with one file hung CI for an hour). A rank that dies without
    reporting, or a group that outlives `timeout` seconds, fails the test instead of hanging it.
    """
    import multiprocessing as mp
    import queue as queue_mod
    import time
    import uuid

    ctx = mp.get_context("spawn")
    results_queue = ctx.Queue()
    store = tmp_path / f"store-{fn.__name__}-{uuid.uuid4().hex}"
    procs = [ctx.Process(target=_distributed_child, args=(r, world_size, store, fn, args, results_queue))
             for r in range(world_size)]
    for p in procs:
        p.start()
    results, deadline, dead_before = {}, time.monotonic() + timeout, set()
    try:
        while len(results) < world_size:
            try:
                rank, value = results_queue.get(timeout=1.0)
                results[rank] = value
                continue
            except queue_mod.Empty:
                pass
            dead = {r for r, p in enumerate(procs) if r not in results and p.exitcode is not None}
            if lost := sorted(dead & dead_before):  # exited and silent for a whole second since: no result coming
                raise RuntimeError(f"rank(s) {lost} exited (codes {[procs[r].exitcode for r in lost]}) "
                                   f"without a result")
            dead_before = dead
            if time.monotonic() > deadline:
                raise TimeoutError(f"{fn.__name__} on {world_size} ranks: no result from ranks "
                                   f"{sorted(set(range(world_size)) - set(results))} after {timeout} s")
    finally:
        for p in procs:
            p.join(timeout=60 if len(results) == world_size else 1)
            if p.is_alive():
                p.kill()
                p.join()
    for r, value in results.items():
        if isinstance(value, BaseException):
            raise RuntimeError(f"rank {r} failed") from value
    return [results[r] for r in range(world_size)]
