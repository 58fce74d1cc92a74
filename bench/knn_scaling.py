"""Neighbour search and GMM cost on this machine; prints a markdown table.

    python bench/knn_scaling.py [--sizes 20000,128000] [--dims 512,2048] [--queries 2048]
        [--indexes exact,sharded2,hnsw,ivf,clustered] [--gmm 128000,1000000]

Embeddings are synthetic and clustered (1000 Gaussian clusters), like penultimate-layer features.
- exact: FAISS brute force on one process over the whole set, timed on `--queries` sampled queries.
- sharded2: `index.knn.knn_sharded` over 2 gloo ranks (each holds half), same sampled queries.
- hnsw / ivf / clustered: the approximate modes, timed **including the index build**, over all N queries.
ms/query, recall@1 against exact (on the sampled queries) and peak resident memory of the process
(each configuration runs in a fresh process).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def embeddings(n: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(1000, d)).astype(np.float32) * 2
    x = centres[rng.integers(0, 1000, n)]
    x += rng.normal(size=(n, d)).astype(np.float32)
    return x


def sampled_queries(n: int, q: int) -> np.ndarray:
    return np.random.default_rng(1).choice(n, size=min(q, n), replace=False)


def exact_reference(x: np.ndarray, rows: np.ndarray) -> np.ndarray:
    import faiss

    _, pos = faiss.knn(x[rows], x, 2)
    return np.where(pos[:, 0] == rows, pos[:, 1], pos[:, 0])


def sharded_child(rank, x, queries, out):
    import torch.distributed as dist

    from index.knn import knn_sharded

    rows = np.array_split(np.arange(len(x)), 2)[rank]
    mask = np.isin(rows, queries)
    dist.barrier()
    t0 = time.perf_counter()
    ids, table = knn_sharded(x[rows], rows, 1, queries=mask)
    seconds = time.perf_counter() - t0
    if rank == 0:
        Path(out).write_text(json.dumps({"seconds": seconds, "ids": ids.tolist(), "nn": table[:, 0].tolist()}))


def run_sharded(x, queries) -> tuple[float, np.ndarray, np.ndarray]:
    import tempfile

    import torch.multiprocessing as mp

    tmp = tempfile.mkdtemp()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29500 + os.getpid() % 1000))
    mp.start_processes(_init_and_run, args=(x, queries, f"{tmp}/out.json"), nprocs=2, start_method="fork")
    result = json.loads(Path(f"{tmp}/out.json").read_text())
    return result["seconds"], np.array(result["ids"]), np.array(result["nn"])


def _init_and_run(rank, x, queries, out):
    import torch.distributed as dist

    os.environ["OMP_NUM_THREADS"] = "1"
    import faiss

    faiss.omp_set_num_threads(1)  # one core per rank: the 2-rank case uses the same 2 cores as 1 rank
    dist.init_process_group("gloo", rank=rank, world_size=2)
    sharded_child(rank, x, queries, out)
    dist.destroy_process_group()


def measure(n: int, d: int, kind: str, q: int) -> dict:
    """One configuration (runs in its own process)."""
    import faiss

    from index.knn import ShardSearcher

    x = embeddings(n, d)
    queries = sampled_queries(n, q)
    if kind == "exact":
        t0 = time.perf_counter()
        found = exact_reference(x, queries)
        seconds, per = time.perf_counter() - t0, len(queries)
    elif kind == "sharded2":
        seconds, ids, nn = run_sharded(x, queries)
        found = nn[np.searchsorted(ids, queries)]
        per = len(queries)
    else:
        t0 = time.perf_counter()
        searcher = ShardSearcher(x, "l2", kind, hnsw_m=32, hnsw_ef=64, ivf_nprobe=8, clustered_nprobe=2)
        _, pos = searcher.search(x, 2)  # every sample queries the whole set
        seconds, per = time.perf_counter() - t0, n
        pos = pos[queries]
        found = np.where(pos[:, 0] == queries, pos[:, 1], pos[:, 0])
    truth = exact_reference(x, queries)  # after the forked ranks: OpenMP must not run before a fork
    recall = float((found == truth).mean())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"n": n, "d": d, "kind": kind, "ms_per_query": 1000 * seconds / per, "seconds": seconds,
            "recall@1": recall, "peak_mb": peak, "threads": faiss.omp_get_max_threads()}


def gmm_seconds(n: int) -> float:
    from index.gmm import clean_probability

    rng = np.random.default_rng(0)
    losses = np.concatenate([rng.gamma(1, 0.3, int(n * 0.6)), rng.normal(3, 0.5, n - int(n * 0.6))])
    t0 = time.perf_counter()
    clean_probability(losses)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="20000,128000")
    p.add_argument("--dims", default="512,2048")
    p.add_argument("--indexes", default="exact,sharded2,hnsw,ivf,clustered")
    p.add_argument("--queries", type=int, default=2048)
    p.add_argument("--gmm", default="128000,1000000")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        n, d, kind = args.one.split(":")
        print(json.dumps(measure(int(n), int(d), kind, args.queries)))
        return
    print("| N | d | search | ms/query | total s | recall@1 | peak RSS MB |\n|---|---|---|---|---|---|---|")
    for n in map(int, args.sizes.split(",")):
        for d in map(int, args.dims.split(",")):
            for kind in args.indexes.split(","):
                out = subprocess.run([sys.executable, __file__, "--one", f"{n}:{d}:{kind}", "--queries",
                                      str(args.queries)], capture_output=True, text=True)
                if out.returncode:
                    print(f"| {n} | {d} | {kind} | failed: {out.stderr.strip().splitlines()[-1]} | | | |")
                    continue
                r = json.loads(out.stdout.strip().splitlines()[-1])
                label = {"exact": "exact, 1 process", "sharded2": "exact, sharded over 2 ranks",
                         "hnsw": "HNSW(32, ef 64) incl. build", "ivf": "IVF-Flat(4 sqrt N, nprobe 8) incl. build",
                         "clustered": "clustered GEMM (sqrt N lists, nprobe 2) incl. build"}[kind]
                print(f"| {n} | {d} | {label} | {r['ms_per_query']:.3f} | {r['seconds']:.1f} | "
                      f"{r['recall@1']:.3f} | {r['peak_mb']:.0f} |", flush=True)
    for n in (int(v) for v in args.gmm.split(",") if v):
        print(f"\nGMM (scikit-learn, 2 components, max_iter 10) on {n:,} losses: {gmm_seconds(n):.2f} s")


if __name__ == "__main__":
    main()
