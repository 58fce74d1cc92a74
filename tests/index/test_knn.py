"""Sharded exact kNN over 2 gloo ranks equals single-process FAISS and torch.cdist + topk."""
import faiss
import numpy as np
import pytest
import torch
from conftest import run_distributed

from index.knn import knn_exact, knn_in_batch, knn_sharded, torch_knn


def cdist_reference(x, ids, k):
    d = torch.cdist(torch.from_numpy(x).double(), torch.from_numpy(x).double()) ** 2
    d.fill_diagonal_(float("inf"))
    return ids[d.topk(k, largest=False).indices.numpy()]


def shard_rows(n, rank, sizes):
    bounds = np.cumsum([0, *sizes])
    return np.arange(bounds[rank], bounds[rank + 1])


def sharded_child(rank, x, ids, k, sizes, metric):
    rows = shard_rows(len(x), rank, sizes)
    return knn_sharded(x[rows], ids[rows], k, metric=metric, block=7)


@pytest.mark.parametrize("k,sizes", [(1, (40, 21)), (3, (1, 60)), (4, (30, 31))])
def test_sharded_equals_single_process(tmp_path, k, sizes):
    rng = np.random.default_rng(k)
    x = rng.normal(size=(61, 16)).astype(np.float32)
    ids = rng.permutation(1000)[:61]  # sample ids need not be positions
    results = run_distributed(sharded_child, 2, x, ids, k, sizes, "l2", tmp_path=tmp_path)
    order = np.argsort(ids)
    expected = cdist_reference(x, ids, k)[order]
    _, faiss_pos = faiss.knn(x, x, k + 1)
    assert np.array_equal(ids[faiss_pos[:, 1:]][order], expected)
    assert np.array_equal(knn_exact(x, ids, k)[order], expected)
    for query_ids, neighbours in results:  # identical on both ranks
        assert np.array_equal(query_ids, ids[order])
        assert np.array_equal(neighbours, expected)


def test_duplicates_ties_break_by_id_and_self_excluded(tmp_path):
    x = np.repeat(np.eye(4, dtype=np.float32), 3, axis=0)  # 4 groups of 3 identical points
    ids = np.arange(12)[::-1].copy()
    results = run_distributed(sharded_child, 2, x, ids, 2, (5, 7), "cosine", tmp_path=tmp_path)
    query_ids, neighbours = results[0]
    for q, row in zip(query_ids, neighbours):
        group = set(ids[np.flatnonzero((x == x[ids.tolist().index(q)]).all(1))].tolist())
        assert q not in row and row.tolist() == sorted(group - {q})
    assert np.array_equal(results[1][1], neighbours)
    assert np.array_equal(knn_exact(x, ids, 2)[np.argsort(ids)], neighbours)


def test_in_batch_scope():
    emb = torch.tensor([[0.0], [0.1], [5.0], [5.2]])
    assert knn_in_batch(emb, 1).flatten().tolist() == [1, 0, 3, 2]


def clustered(n, d, clusters, seed):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, d)) * 4
    return (centres[rng.integers(0, clusters, n)] + rng.normal(size=(n, d))).astype(np.float32)


def approx_child(rank, x, ids, index):
    from index.knn import knn_with_recall

    rows = np.array_split(np.arange(len(x)), 2)[rank]
    return knn_with_recall(x[rows], ids[rows], 1, index=index, recall_queries=400, transfer_dtype=np.float16,
                           hnsw_m=16, hnsw_ef=64, ivf_nprobe=8, clustered_nprobe=2)


@pytest.mark.parametrize("index,stated", [("hnsw", 0.95), ("ivf", 0.9), ("clustered", 0.95)])
def test_approximate_modes_reach_their_stated_recall(tmp_path, index, stated):
    x = clustered(4000, 32, 40, seed=1)
    ids = np.arange(4000)
    results = run_distributed(approx_child, 2, x, ids, index, tmp_path=tmp_path)
    (q0, t0, r0), (q1, t1, r1) = results
    assert np.array_equal(t0, t1) and r0 == r1  # identical on both ranks, recall included
    truth = knn_exact(x, ids, 1)
    true_recall = float((t0[:, 0] == truth[:, 0]).mean())
    assert true_recall >= stated and r0 >= stated
    assert abs(r0 - true_recall) < 0.05  # the sampled estimate tracks the real recall


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_clustered_index_with_every_list_probed_is_exact(metric):
    from index.knn import ShardSearcher, prepare_embeddings

    x = prepare_embeddings(clustered(600, 16, 6, seed=2), metric)
    queries = prepare_embeddings(clustered(50, 16, 6, seed=3), metric)
    exact_d, exact_p = ShardSearcher(x, metric).search(queries, 3)
    full = ShardSearcher(x, metric, "clustered", clustered_nprobe=10**6)  # probes every list
    d, p = full.search(queries, 3)
    assert np.array_equal(p, exact_p) and np.allclose(d, exact_d, atol=1e-4)
    one = ShardSearcher(x, metric, "clustered", clustered_nprobe=1)  # only the query's own list
    _, p1 = one.search(queries, 3)
    lists = one.index.nearest_centroid(x)
    own = one.index.nearest_centroid(queries)
    assert (lists[p1] == own[:, None]).all()  # every answer comes from the probed list


def pca_child(rank, x, ids, dim, index):
    from index.knn import knn_with_recall

    rows = np.array_split(np.arange(len(x)), 2)[rank]
    return knn_with_recall(x[rows], ids[rows], 2, index=index, recall_queries=300, dim=dim, clustered_nprobe=4)


@pytest.mark.parametrize("index", ["exact", "clustered"])
def test_pca_projected_search_on_two_ranks(tmp_path, index):
    """Rows spanning 12 of 256 dimensions (plus faint noise): the search on their 12-d PCA projection finds
    the full-dimension neighbours; both ranks project with rank 0's matrix, so the tables are identical, and
    the recall is measured against exact full-dimension search (reported even with the exact index)."""
    rng = np.random.default_rng(5)
    x = (clustered(1500, 12, 20, seed=4) @ rng.normal(size=(12, 256)) + 0.01 * rng.normal(size=(1500, 256)))
    x = x.astype(np.float32)
    ids = np.arange(1500)
    (q0, t0, r0), (q1, t1, r1) = run_distributed(pca_child, 2, x, ids, 12, index, tmp_path=tmp_path)
    assert np.array_equal(t0, t1) and r0 == r1 and r0 is not None
    true_recall = float((t0 == knn_exact(x, ids, 2)).mean())
    assert true_recall > (0.99 if index == "exact" else 0.95) and abs(r0 - true_recall) < 0.05
    # too few dimensions lose neighbours, and the recall says so
    (_, t2, r2), _ = run_distributed(pca_child, 2, x, ids, 2, index, tmp_path=tmp_path)
    assert r2 < 0.9 and float((t2 == knn_exact(x, ids, 2)).mean()) < 0.9


def test_cuda_with_the_cpu_faiss_wheel_searches_with_torch(monkeypatch):
    """A CUDA machine with faiss-cpu (what pip installs) defines `faiss.knn_gpu` but no `StandardGpuResources`
    (this crashed the first run on an H100): no FAISS GPU resources, the exact search runs `torch_knn` on
    the GPU (here redirected to the CPU), with FAISS's neighbours."""
    from index import knn

    knn.gpu_resources.cache_clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.delattr(faiss, "StandardGpuResources", raising=False)
    devices = []
    monkeypatch.setattr(knn, "torch_knn", lambda q, x, k, m, device: devices.append(device) or
                        torch_knn(q, x, k, m, "cpu"))
    try:
        assert knn.gpu_resources() is None
        x = np.random.default_rng(0).normal(size=(50, 8)).astype(np.float32)
        dist, pos = knn.ShardSearcher(x, "l2").search(x[:5], 2)
        assert devices and devices[0].type == "cuda"
        assert (pos[:, 0] == np.arange(5)).all() and np.allclose(dist[:, 0], 0, atol=1e-4)
    finally:
        knn.gpu_resources.cache_clear()


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_torch_exact_search_equals_faiss(metric):
    from index.knn import ShardSearcher

    rng = np.random.default_rng(1)
    x = rng.normal(size=(3000, 32)).astype(np.float32)
    q = rng.normal(size=(700, 32)).astype(np.float32)
    if metric == "cosine":
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        q /= np.linalg.norm(q, axis=1, keepdims=True)
    want_d, want_p = faiss.knn(q, x, 5, metric=ShardSearcher(x, metric).faiss_metric)
    got_d, got_p = torch_knn(q, x, 5, metric, "cpu", block=256)  # several query blocks
    assert (got_p == want_p).mean() > 0.999 and np.allclose(got_d, want_d, atol=1e-3)
