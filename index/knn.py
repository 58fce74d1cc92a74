"""Nearest neighbours in embedding space, exact, with the database sharded across ranks.

Each rank keeps only its own slice of embeddings. The ranks take turns as the query source: the
source broadcasts a block of its queries, every rank searches its shard (FAISS: `faiss.knn_gpu` on the
rank's own GPU when present, FAISS CPU otherwise), and the per-shard top-K candidates (distance, id)
are all-gathered and merged. Self matches are excluded by sample id; ties break by (distance, id).

Peak memory per rank: its shard (n_local x d) + one query block (block x d) + W x block x (K+1)
candidates + the final table N x K int64. Nothing N x d is ever held on one rank.
"""
from __future__ import annotations

import numpy as np
import torch

from .comm import all_gather_rows, broadcast_array, world

METRICS = ("l2", "cosine")


def prepare_embeddings(embeddings: np.ndarray, metric: str) -> np.ndarray:
    """float32, C-contiguous; L2-normalised for the cosine metric."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    if metric == "cosine":
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return x


def search_shard(queries: np.ndarray, shard: np.ndarray, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """(distances, positions) [q, k] of the k nearest shard rows; -1 / inf where the shard is too small.

    Distances: squared L2, or 1 - cosine similarity; smaller is nearer in both.
    """
    import faiss

    q, kk = len(queries), min(k, len(shard))
    dist = np.full((q, k), np.inf, dtype=np.float32)
    pos = np.full((q, k), -1, dtype=np.int64)
    if kk == 0 or q == 0:
        return dist, pos
    faiss_metric = faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT
    if torch.cuda.is_available() and hasattr(faiss, "knn_gpu"):  # GPU branch: not exercised by CI
        res = faiss.StandardGpuResources()
        d, p = faiss.knn_gpu(res, queries, shard, kk, metric=faiss_metric, device=torch.cuda.current_device())
    else:
        d, p = faiss.knn(queries, shard, kk, metric=faiss_metric)
    dist[:, :kk] = d if metric == "l2" else 1.0 - d
    pos[:, :kk] = p
    return dist, pos


def merge_topk(dist: np.ndarray, ids: np.ndarray, query_ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k per row of candidate (dist, id) pairs, self and missing excluded, ties by (distance, id)."""
    dist = np.where((ids == query_ids[:, None]) | (ids < 0), np.inf, dist)
    order = np.lexsort((ids, dist), axis=1)[:, :k]  # last key is primary: distance, then id
    return np.take_along_axis(dist, order, 1), np.take_along_axis(ids, order, 1)


def knn_sharded(embeddings: np.ndarray, ids: np.ndarray, k: int, *, metric: str = "l2",
                block: int = 16384) -> tuple[np.ndarray, np.ndarray]:
    """K nearest other samples of every sample id across all ranks' shards.

    Called by every rank with its own (embeddings [n_r, d], ids [n_r]). Returns (all ids sorted [N],
    neighbour ids [N, k]) identical on every rank; row i belongs to the i-th smallest sample id.
    """
    rank, size = world()
    shard = prepare_embeddings(embeddings, metric)
    ids = np.asarray(ids, dtype=np.int64)
    counts = [len(c) for c in all_gather_rows(ids)]
    all_query_ids, all_neighbours = [], []
    for src in range(size):
        src_ids = broadcast_array(ids if rank == src else None, src)
        for start in range(0, counts[src], block):
            end = min(start + block, counts[src])
            queries = broadcast_array(shard[start:end] if rank == src else None, src)
            dist, pos = search_shard(queries, shard, k + 1, metric)  # +1: the query itself may be here
            cand_ids = np.where(pos >= 0, ids[np.maximum(pos, 0)] if len(ids) else -1, -1)
            dist, cand_ids = merge_topk(dist, cand_ids, src_ids[start:end], k)
            gathered_d = np.concatenate(all_gather_rows(dist.T.copy()), axis=0).T  # [q, W*k]
            gathered_i = np.concatenate(all_gather_rows(cand_ids.T.copy()), axis=0).T
            _, best = merge_topk(gathered_d, gathered_i, src_ids[start:end], k)
            all_query_ids.append(src_ids[start:end])
            all_neighbours.append(best)
    query_ids = np.concatenate(all_query_ids)
    neighbours = np.concatenate(all_neighbours).reshape(-1, k)
    order = np.argsort(query_ids, kind="stable")
    return query_ids[order], neighbours[order]


def knn_exact(embeddings: np.ndarray, ids: np.ndarray, k: int, *, metric: str = "l2") -> np.ndarray:
    """Single-process reference: neighbour ids [n, k] of each row (self excluded by id)."""
    x = prepare_embeddings(embeddings, metric)
    ids = np.asarray(ids, dtype=np.int64)
    dist, pos = search_shard(x, x, k + 1, metric)
    return merge_topk(dist, np.where(pos >= 0, ids[np.maximum(pos, 0)], -1), ids, k)[1]


def knn_in_batch(embeddings: torch.Tensor, k: int = 1) -> torch.Tensor:
    """Positions [b, k] of each row's nearest other rows inside one mini-batch (the authors' code scope)."""
    d = torch.cdist(embeddings.float(), embeddings.float())
    d.fill_diagonal_(float("inf"))
    return d.topk(min(k, len(d) - 1), largest=False).indices
