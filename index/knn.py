"""Nearest neighbours in embedding space, exact, with the database sharded across ranks.

Each rank keeps only its own slice of embeddings. The ranks take turns as the query source: the
source broadcasts a block of its queries, every rank searches its shard (`faiss.knn_gpu` on the rank's
own GPU with faiss-gpu, PyTorch matrix products on it with faiss-cpu, FAISS CPU without a GPU), and the
per-shard top-K candidates (distance, id) are all-gathered and merged. Self matches are excluded by
sample id; ties break by (distance, id).

Peak memory per rank: its shard (n_local x d float32, plus the HNSW graph ~ n_local x 2M x 4 bytes or
the IVF lists ~ n_local x d x 4 bytes in approximate mode) + one query block (block x d) + one
faiss distance block + W x block x (K+1) candidates + the final table N x K int64. Nothing N x d is
ever held on one rank.
"""
from __future__ import annotations

import functools

import numpy as np
import torch

from .comm import all_gather_rows, broadcast_array, world

METRICS = ("l2", "cosine")
INDEXES = ("exact", "hnsw", "ivf", "clustered")


def prepare_embeddings(embeddings: np.ndarray, metric: str) -> np.ndarray:
    """float32, C-contiguous; L2-normalised for the cosine metric."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    if metric == "cosine":
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return x


def kmeans_centroids(x: np.ndarray, k: int, faiss_metric, niter: int, seed: int) -> np.ndarray:
    import faiss

    kmeans = faiss.Kmeans(x.shape[1], k, niter=niter, max_points_per_centroid=64, seed=seed,
                          spherical=faiss_metric == faiss.METRIC_INNER_PRODUCT)
    kmeans.train(x)
    return kmeans.centroids


def nearest_centroid(x: np.ndarray, centroids: np.ndarray, faiss_metric) -> np.ndarray:
    """Position of each row's nearest centroid."""
    import faiss

    return faiss.knn(x, centroids, 1, metric=faiss_metric)[1][:, 0]


def balanced_centroids(x: np.ndarray, nlist: int, faiss_metric, niter: int, seed: int) -> np.ndarray:
    """k-means centroids, then every list holding more than twice the mean list size split by a k-means
    of its own members (list sizes decide the cost of a blocked search: a list of m rows costs ~m^2;
    plain k-means on clustered data left lists 20x the mean and searches 6-12x slower than balanced)."""
    centroids = kmeans_centroids(x, nlist, faiss_metric, niter, seed)
    target = max(len(x) / nlist, 1.0)
    for round_ in range(2):  # a split moves rows between lists: a second round catches what grew
        lists = nearest_centroid(x, centroids, faiss_metric)
        out = []
        for c in range(len(centroids)):
            members = np.flatnonzero(lists == c)
            parts = int(np.ceil(len(members) / target))
            if len(members) > 2 * target and parts > 1:
                out.append(kmeans_centroids(x[members], parts, faiss_metric, niter, seed + 1 + c + round_ * nlist))
            elif len(members):
                out.append(centroids[c:c + 1])
        centroids = np.ascontiguousarray(np.concatenate(out), dtype=np.float32)
    return centroids


class ClusteredIndex:
    """Approximate search as dense blocks (an IVF whose lists are searched with BLAS, not scanned).

    k-means (FAISS, `niter` iterations on <= 64 points per centroid) splits the shard into `nlist` lists
    (default sqrt(n)); the shard is stored sorted by list. Queries are grouped by their nearest
    centroid c, and each group is searched exactly (one `faiss.knn` = one GEMM) against the rows of the
    `nprobe` lists whose centroids are nearest to c (c included). Per query that is nprobe x n / nlist
    distances, like IVF-Flat with nprobe lists, but at matrix-multiply speed: IVF-Flat's per-query list
    scan runs at ~2.5 GFLOP/s on this CPU, a GEMM block at ~130. Probing by the group's centroid rather
    than by each query misses a neighbour only when it lies beyond the nprobe lists nearest to the
    query's own list. Memory: the sorted copy of the shard (n x d) + centroids (nlist x d).
    `search` answers like a FAISS index: (distances or similarities, positions in the unsorted shard).
    """

    def __init__(self, shard: np.ndarray, faiss_metric, *, nlist: int = 0, nprobe: int = 2, niter: int = 10,
                 seed: int = 0):
        import faiss

        n = len(shard)
        self.metric = faiss_metric
        self.centroids = balanced_centroids(shard, max(1, min(nlist or int(np.sqrt(n)), n)), faiss_metric, niter,
                                            seed)
        self.nlist = len(self.centroids)  # the balancing splits lists, so more than asked for
        lists = self.nearest_centroid(shard)
        self.order = np.argsort(lists, kind="stable")  # sorted position -> shard position
        self.sorted = np.ascontiguousarray(shard[self.order])
        self.bounds = np.searchsorted(lists[self.order], np.arange(self.nlist + 1))
        _, self.probe = faiss.knn(self.centroids, self.centroids, min(nprobe, self.nlist), metric=faiss_metric)

    def nearest_centroid(self, x: np.ndarray) -> np.ndarray:
        return nearest_centroid(x, self.centroids, self.metric)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        import faiss

        worst = np.inf if self.metric == faiss.METRIC_L2 else -np.inf
        dist = np.full((len(queries), k), worst, dtype=np.float32)
        pos = np.full((len(queries), k), -1, dtype=np.int64)
        groups = self.nearest_centroid(queries)
        for c in np.unique(groups):
            rows = np.flatnonzero(groups == c)
            lists = [j for j in self.probe[c] if j >= 0 and self.bounds[j + 1] > self.bounds[j]]
            candidates = np.concatenate([np.arange(self.bounds[j], self.bounds[j + 1]) for j in lists])
            block = np.concatenate([self.sorted[self.bounds[j]:self.bounds[j + 1]] for j in lists])
            kk = min(k, len(candidates))
            d, p = faiss.knn(queries[rows], block, kk, metric=self.metric)
            dist[rows, :kk] = d
            pos[rows, :kk] = np.where(p >= 0, self.order[candidates[np.maximum(p, 0)]], -1)
        return dist, pos


@functools.lru_cache(maxsize=1)
def gpu_resources():
    """FAISS GPU resources for this rank's GPU, created once; None when CUDA or a GPU build of FAISS is missing.

    faiss-cpu defines `faiss.knn_gpu` but not `StandardGpuResources`: a CUDA machine with the CPU wheel (what
    `pip install` gives) searches with `torch_knn` instead."""
    import faiss

    if not (torch.cuda.is_available() and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0):
        return None
    return faiss.StandardGpuResources()


def torch_knn(queries: np.ndarray, shard: np.ndarray, k: int, metric: str, device,
              block: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Exact brute-force search with PyTorch matrix products on `device`, in FAISS's conventions: (squared L2
    distances, or inner products for cosine) and shard positions [q, k]. The CUDA path where pip gave the
    faiss-cpu wheel: 57k x 57k x 1024 takes a fraction of a second on a GPU, about a minute on one CPU thread.
    Queries go in blocks whose [block, n] distance matrix holds 2^24 floats (64 MB; 0 = that default): 8192-row
    blocks took 8 GB per process on an H100 and 16 runs sharing it ran out of memory."""
    block = block or max(1, 2**24 // max(len(shard), 1))
    x = torch.from_numpy(shard).to(device)
    norms = (x * x).sum(1)
    dist, pos = [], []
    for start in range(0, len(queries), block):
        q = torch.from_numpy(queries[start:start + block]).to(device)
        products = q @ x.T
        if metric == "l2":
            d, p = ((q * q).sum(1, keepdim=True) + norms[None] - 2 * products).clamp_min(0).topk(k, 1, largest=False)
        else:
            d, p = products.topk(k, 1, largest=True)
        dist.append(d.cpu())
        pos.append(p.cpu())
    return torch.cat(dist).numpy(), torch.cat(pos).numpy()


class ShardSearcher:
    """Searches one rank's shard. `exact` is brute force: `faiss.knn_gpu` on this rank's own GPU when CUDA
    and faiss-gpu are present, `torch_knn` on it when CUDA is there but FAISS is the CPU build (both not
    exercised by CI), FAISS CPU otherwise; `hnsw` and `ivf` build an approximate FAISS index over the shard
    once and answer every query block from it;
    `clustered` is `ClusteredIndex` (k-means lists searched as dense GEMM blocks).

    Distances: squared L2, or 1 - cosine similarity; smaller is nearer in both.
    """

    def __init__(self, shard: np.ndarray, metric: str, index: str = "exact", *, hnsw_m: int = 32,
                 hnsw_ef: int = 64, ivf_nlist: int = 0, ivf_nprobe: int = 8, clustered_nprobe: int = 2):
        import faiss

        self.shard = np.ascontiguousarray(shard, dtype=np.float32)
        self.metric = metric
        self.faiss_metric = faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT
        self.kind = index
        self.index = None
        n, d = self.shard.shape
        if index == "hnsw" and n:
            self.index = faiss.IndexHNSWFlat(d, hnsw_m, self.faiss_metric)
            self.index.hnsw.efConstruction = max(hnsw_ef, 40)
            self.index.add(self.shard)
            self.index.hnsw.efSearch = hnsw_ef
        elif index == "ivf" and n:
            nlist = ivf_nlist or max(1, min(n // 39, int(4 * np.sqrt(n))))  # faiss wants >= 39 points a list
            quantizer = faiss.IndexFlat(d, self.faiss_metric)
            self.index = faiss.IndexIVFFlat(quantizer, d, nlist, self.faiss_metric)
            sample = self.shard[np.random.default_rng(0).permutation(n)[: nlist * 64]]
            self.index.train(sample)
            self.index.add(self.shard)
            self.index.nprobe = min(ivf_nprobe, nlist)
            self._quantizer = quantizer  # keep alive: the IVF index does not own it
        elif index == "clustered" and n:
            self.index = ClusteredIndex(self.shard, self.faiss_metric, nprobe=clustered_nprobe)
        elif index not in INDEXES:
            raise ValueError(f"knn index must be one of {INDEXES}, got {index!r}")

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(distances, positions) [q, k]; -1 / inf where the shard has fewer than k rows."""
        import faiss

        queries = np.ascontiguousarray(queries, dtype=np.float32)
        q, kk = len(queries), min(k, len(self.shard))
        dist = np.full((q, k), np.inf, dtype=np.float32)
        pos = np.full((q, k), -1, dtype=np.int64)
        if kk == 0 or q == 0:
            return dist, pos
        if self.index is not None:
            d, p = self.index.search(queries, kk)
        elif (resources := gpu_resources()) is not None:  # GPU branch: not exercised by CI
            d, p = faiss.knn_gpu(resources, queries, self.shard, kk, metric=self.faiss_metric,
                                 device=torch.cuda.current_device())
        elif torch.cuda.is_available():  # GPU without a GPU build of FAISS: not exercised by CI
            d, p = torch_knn(queries, self.shard, kk, self.metric, torch.device("cuda", torch.cuda.current_device()))
        else:
            d, p = faiss.knn(queries, self.shard, kk, metric=self.faiss_metric)
        found = p >= 0
        dist[:, :kk] = np.where(found, d if self.metric == "l2" else 1.0 - d, np.inf)
        pos[:, :kk] = p
        return dist, pos


def merge_topk(dist: np.ndarray, ids: np.ndarray, query_ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k per row of candidate (dist, id) pairs, self and missing excluded, ties by (distance, id)."""
    dist = np.where((ids == query_ids[:, None]) | (ids < 0), np.inf, dist)
    order = np.lexsort((ids, dist), axis=1)[:, :k]  # last key is primary: distance, then id
    return np.take_along_axis(dist, order, 1), np.take_along_axis(ids, order, 1)


def knn_sharded(embeddings: np.ndarray, ids: np.ndarray, k: int, *, metric: str = "l2", block: int = 16384,
                index: str = "exact", queries: np.ndarray | None = None, database: np.ndarray | None = None,
                transfer_dtype=np.float32, **index_options) -> tuple[np.ndarray, np.ndarray]:
    """K nearest other samples of every sample id across all ranks' shards.

    Called by every rank with its own (embeddings [n_r, d], ids [n_r]); `queries` (bool [n_r]) limits
    which local rows are queried (default all), `database` (bool [n_r]) which local rows may be found
    as neighbours (default all; e.g. only the samples judged clean). Query blocks travel as `transfer_dtype` (float16 halves
    the traffic). Returns (query ids sorted [Q], neighbour ids [Q, k]) identical on every rank.
    """
    rank, size = world()
    shard = prepare_embeddings(embeddings, metric)
    ids = np.asarray(ids, dtype=np.int64)
    found = np.flatnonzero(database) if database is not None else np.arange(len(ids))
    # no copy of the shard when every row may be found
    searcher = ShardSearcher(shard if database is None else shard[found], metric, index, **index_options)
    db_ids = ids[found]
    local = np.flatnonzero(queries) if queries is not None else np.arange(len(ids))
    counts = [len(c) for c in all_gather_rows(local)]
    all_query_ids, all_neighbours = [], []
    for src in range(size):
        src_ids = broadcast_array(ids[local] if rank == src else None, src)
        for start in range(0, counts[src], block):
            end = min(start + block, counts[src])
            mine = shard[local[start:end]].astype(transfer_dtype) if rank == src else None
            queries_block = broadcast_array(mine, src).astype(np.float32)
            dist, pos = searcher.search(queries_block, k + 1)  # +1: the query itself may be here
            cand_ids = np.where(pos >= 0, db_ids[np.maximum(pos, 0)] if len(db_ids) else -1, -1)
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


def recall_at_k(approximate: np.ndarray, exact: np.ndarray) -> float:
    """Mean fraction of the exact k neighbours that the approximate search also returned."""
    hits = [len(set(a[a >= 0]) & set(e[e >= 0])) / max((e >= 0).sum(), 1) for a, e in zip(approximate, exact)]
    return float(np.mean(hits)) if hits else 1.0


def sample_mask(ids: np.ndarray, fraction: float) -> np.ndarray:
    """A deterministic pseudo-random subset of ids (same choice on every rank, by id)."""
    hashed = (np.asarray(ids, dtype=np.uint64) * np.uint64(2654435761)) % np.uint64(2**32)
    return hashed < np.uint64(int(fraction * 2**32))


def pca_projection(embeddings: np.ndarray, dim: int, sample: int = 4096) -> np.ndarray:
    """[d, dim] float32: the top `dim` principal directions of up to `sample` rows drawn evenly from every
    rank's embeddings, fitted on rank 0 and broadcast, so every rank projects with the same matrix."""
    rank, size = world()
    step = max(1, len(embeddings) * size // sample)
    rows = np.concatenate(all_gather_rows(np.ascontiguousarray(embeddings[::step], dtype=np.float32)))
    matrix = None
    if rank == 0:
        centred = rows.astype(np.float64) - rows.mean(0)
        _, vectors = np.linalg.eigh(centred.T @ centred)  # eigenvalues ascending
        matrix = np.ascontiguousarray(vectors[:, ::-1][:, :dim], dtype=np.float32)
    return broadcast_array(matrix, src=0)


def search_space(embeddings: np.ndarray, metric: str, dim: int = 0) -> tuple[np.ndarray, str]:
    """(vectors, metric) the search runs on: the embeddings themselves, or with `dim` > 0 (and below their
    width) their PCA projection to `dim` dimensions, searched by L2 (cosine: rows normalised first, so L2
    ranks as cosine did). The projection cuts every search cost (k-means, GEMM blocks, query traffic) by
    d / dim; what it loses shows in the recall against exact full-dimension search."""
    if dim <= 0 or dim >= embeddings.shape[1]:
        return embeddings, metric
    x = prepare_embeddings(embeddings, metric)
    return x @ pca_projection(x, dim), "l2"


def knn_with_recall(embeddings: np.ndarray, ids: np.ndarray, k: int, *, index: str, recall_queries: int = 1000,
                    dim: int = 0, **options) -> tuple[np.ndarray, np.ndarray, float | None]:
    """Approximate search (an approximate index and/or a PCA projection to `dim` dimensions) plus its
    recall@k against exact full-dimension search on ~`recall_queries` sampled queries (None when exact)."""
    vectors, metric = search_space(embeddings, options.get("metric", "l2"), dim)
    query_ids, table = knn_sharded(vectors, ids, k, index=index, **{**options, "metric": metric})
    if index == "exact" and vectors is embeddings:
        return query_ids, table, None
    fraction = min(1.0, recall_queries / max(len(query_ids), 1))
    exact_ids, exact = knn_sharded(embeddings, ids, k, index="exact", queries=sample_mask(ids, fraction),
                                   **{key: v for key, v in options.items()
                                      if key in ("metric", "block", "transfer_dtype", "database")})
    rows = np.searchsorted(query_ids, exact_ids)
    return query_ids, table, recall_at_k(table[rows], exact)


def knn_exact(embeddings: np.ndarray, ids: np.ndarray, k: int, *, metric: str = "l2") -> np.ndarray:
    """Single-process reference: neighbour ids [n, k] of each row (self excluded by id)."""
    x = prepare_embeddings(embeddings, metric)
    ids = np.asarray(ids, dtype=np.int64)
    dist, pos = ShardSearcher(x, metric).search(x, k + 1)
    return merge_topk(dist, np.where(pos >= 0, ids[np.maximum(pos, 0)], -1), ids, k)[1]


def knn_in_batch(embeddings: torch.Tensor, k: int = 1) -> torch.Tensor:
    """Positions [b, k] of each row's nearest other rows inside one mini-batch (the authors' code scope)."""
    d = torch.cdist(embeddings.float(), embeddings.float())
    d.fill_diagonal_(float("inf"))
    return d.topk(min(k, len(d) - 1), largest=False).indices
