"""The per-sample tables of an epoch: losses gathered by id -> GMM clean probabilities, EMA soft targets,
neighbour table; identical on every rank (checked by CRC)."""
from __future__ import annotations

import functools
import time
import zlib
from typing import TYPE_CHECKING

import numpy as np
import torch

from data.reader import ShardDataset
from index.comm import all_gather_rows, broadcast_array, gather_by_id
from index.gmm import CleanFit, clean_probability, clean_probability_by_class, normalise_losses
from index.knn import knn_sharded, knn_with_recall, search_space

from .config import gmm_setting, method_default
from .dataset import Data
from .figures import gmm_figure
from .loop import RefreshStats, batched, eval_batch_size, refresh
from .metrics import label_correction_accuracy, neighbour_agreement, noise_detection
from .results import EpochResult
from .seeds import gmm_seed
from .targets import Tables, clean_weights, sharpen_rows

if TYPE_CHECKING:  # Config is built on first use (train.config.config_class)
    from .config import Config


def per_sample_loss(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Cross-entropy -log p[label] of each row."""
    return -np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None))


def windowed_losses(history: np.ndarray | None, losses: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """Push this refresh's losses into the [W, N] history; return (history, per-sample mean over it).

    Samples absent from a refresh (NaN) are averaged over the refreshes that saw them.
    """
    if window <= 1:
        return None, losses
    if history is None:
        history = np.full((window, len(losses)), np.nan, dtype=np.float32)
    history = np.concatenate([history[1:], losses[None].astype(np.float32)])
    seen = ~np.isnan(history)
    mean = np.where(seen.any(0), np.nansum(history, 0) / np.maximum(seen.sum(0), 1), np.nan)
    return history, mean.astype(np.float32)


def fit_clean(losses: np.ndarray, seed: int, is_main: bool, labels: np.ndarray | None = None,
              scale: str = "linear") -> tuple[np.ndarray, CleanFit | None]:
    """GMM on rank 0, clean probabilities broadcast (NaN losses: never refreshed -> probability 0). With
    `labels` [N] (those the losses were computed against), one mixture per label."""
    fit = None
    prob = None
    if is_main:
        seen = ~np.isnan(losses)
        fit = (clean_probability(losses[seen], seed=seed, scale=scale) if labels is None else
               clean_probability_by_class(losses[seen], labels[seen], seed=seed, scale=scale))
        prob = np.zeros(len(losses), np.float32)
        prob[seen] = fit.prob
    return broadcast_array(prob, src=0), fit


def neighbour_pool(cfg: Config, tables: Tables) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(pool [N] bool or None, class [N] or None): where neighbours may come from. `clean`: samples with
    P(clean) above the threshold; `class`: those of them whose corrected label is the anchor's."""
    if cfg.neighbour_pool == "all":
        return None, None
    pool = tables.clean > cfg.clean_threshold
    return pool, (tables.targets.corrected() if cfg.neighbour_pool == "class" else None)


def neighbour_table(stats: RefreshStats, num_samples: int, cfg, pool: np.ndarray | None = None,
                    classes: np.ndarray | None = None) -> tuple[np.ndarray, float | None]:
    """[N, k] neighbour ids (-1 for ids outside the epoch or without a neighbour in the pool) via the
    sharded search, and the recall@k of an approximate index against exact search on sampled queries
    (None when exact or per-class). `pool` [N] bool limits the neighbours, `classes` [N] searches each
    anchor's neighbours among the pool members of its own class."""
    options = dict(transfer_dtype=np.dtype(cfg.embed_transfer), hnsw_m=cfg.hnsw_m,
                   hnsw_ef=cfg.hnsw_ef, ivf_nprobe=cfg.ivf_nprobe, clustered_nprobe=cfg.clustered_nprobe)
    table = np.full((num_samples, cfg.k), -1, dtype=np.int64)
    database = None if pool is None else pool[stats.ids]
    if classes is None:
        query_ids, neighbours, recall = knn_with_recall(stats.embeddings, stats.ids, cfg.k, index=cfg.knn_index,
                                                        recall_queries=cfg.recall_queries, database=database,
                                                        dim=cfg.knn_dim, metric=cfg.metric, **options)
        table[query_ids] = neighbours
        return table, recall
    local = classes[stats.ids]
    vectors, metric = search_space(stats.embeddings, cfg.metric, cfg.knn_dim)
    for c in range(int(classes.max()) + 1):  # every rank runs the same classes (collectives inside)
        query_ids, neighbours = knn_sharded(vectors, stats.ids, cfg.k, index=cfg.knn_index, metric=metric,
                                            queries=local == c, database=database & (local == c), **options)
        table[query_ids] = neighbours
    return table, None


def refined_rows(probs: np.ndarray, ids: np.ndarray, labels: np.ndarray, clean: np.ndarray) -> np.ndarray:
    """DivideMix's label refinement w y + (1 - w) p of the rows of `ids`, w = P(clean), y the given label."""
    w = clean[ids][:, None]
    given = np.eye(probs.shape[1], dtype=np.float32)[labels[ids]]
    return (w * given + (1 - w) * probs).astype(np.float32)


def target_rows(cfg: Config, stats: RefreshStats, labels: np.ndarray, clean: np.ndarray) -> np.ndarray:
    """What the EMA moves this rank's targets toward: the (sharpened) prediction p (Eq. 12), or with
    `target_source: refined` DivideMix's refinement w y + (1 - w) p, w = P(clean)."""
    p = stats.probs if cfg.sharpen == 1.0 else sharpen_rows(torch.from_numpy(stats.probs), cfg.sharpen).numpy()
    return p if cfg.target_source == "prediction" else refined_rows(p, stats.ids, labels, clean)


def correction_due(cfg: Config, epoch: int) -> bool:
    """Whether the refresh of 0-based `epoch` moves the soft targets: from epoch index E_s on, i.e. from the
    (E_s + 1)-th epoch. The MixNN authors' code counts epochs from 1 and first uses soft targets in its
    epoch E_s; to reproduce "from epoch 60" exactly set `correction_epoch: 59` (the paper configs do). With
    `target_update_every` N > 1 only the epochs from E_s whose 1-based count is a multiple of N move them (the
    authors' `epoch % 10 == 0`: with cosine restarts every N epochs, the last, lowest-lr epoch of each cycle)."""
    every = method_default(cfg, "target_update_every")
    return 0 <= cfg.correction_epoch <= epoch and (epoch + 1) % every == 0


def update_targets(tables: Tables, stats: RefreshStats, new: np.ndarray, momentum: float) -> None:
    """Eq. 12 (t = a t + (1 - a) new) on this rank's rows, then every rank writes every rank's new rows."""
    rows = tables.targets.ema_rows(stats.ids, torch.from_numpy(new), momentum).numpy()
    for ids, part in zip(all_gather_rows(stats.ids), all_gather_rows(rows)):  # rank by rank: no N-row copy
        tables.targets.assign(ids, torch.from_numpy(part))


def apply_step_updates(tables: Tables, updates: list[tuple[np.ndarray, np.ndarray]], momentum: float) -> int:
    """Write the soft-target moves of an epoch's training steps (`target_update: step`) into the tables of
    every rank: all ranks' (ids, p) in rank and step order, an id moved once (its first step: a padded
    epoch repeats a few ids). Returns the number of samples moved."""
    ids = np.concatenate([u[0] for u in updates]) if updates else np.zeros(0, np.int64)
    probs = np.concatenate([u[1] for u in updates]) if updates else np.zeros((0, tables.targets.num_classes), np.float32)
    ids, probs = np.concatenate(all_gather_rows(ids)), np.concatenate(all_gather_rows(probs.astype(np.float32)))
    ids, first = np.unique(ids, return_index=True)
    if len(ids):
        tables.targets.assign(ids, tables.targets.ema_rows(ids, torch.from_numpy(probs[first]), momentum))
    return len(ids)


def refresh_train(cfg: Config, model, data: Data, ids: np.ndarray, accelerator, progress: bool = False) -> RefreshStats:
    """The refresh pass (eval mode, no augmentation) over this rank's training ids."""
    return refresh(accelerator.unwrap_model(model), data.train_plain, batched(ids, eval_batch_size(cfg, accelerator)),
                   accelerator, cfg.workers, progress=progress)


def refresh_tables(ctx) -> EpochResult:
    """Refresh pass -> GMM clean probabilities -> soft targets (epoch >= E_s) -> neighbour table, for the
    epoch of `ctx` (a train.methods.EpochContext)."""
    cfg, data, plan, tables, accelerator = ctx.cfg, ctx.data, ctx.plan, ctx.tables, ctx.accelerator
    t0 = time.perf_counter()
    stats = refresh_train(cfg, ctx.model, data, plan.refresh_slice(ctx.rank), accelerator,
                          progress=cfg.progress and accelerator.is_local_main_process)
    t1 = time.perf_counter()
    labels = tables.targets.corrected() if cfg.gmm_loss == "corrected" else data.train.labels
    losses = gather_losses(stats, labels)
    t_gathered = time.perf_counter()
    tables.loss_history, losses, clean, fit = fit_losses(cfg, losses, tables.loss_history,
                                                         gmm_seed(cfg.seed, ctx.epoch), accelerator.is_main_process,
                                                         labels)
    tables.clean = clean
    t2 = time.perf_counter()
    if correction_due(cfg, ctx.epoch) and cfg.target_update == "refresh":
        update_targets(tables, stats, target_rows(cfg, stats, data.train.labels, clean), cfg.ema)
    t3 = time.perf_counter()
    if cfg.knn_scope == "global":
        tables.partners, recall = neighbour_table(stats, len(data.train), cfg, *neighbour_pool(cfg, tables))
    else:
        tables.partners, recall = None, None  # in-batch neighbours are found at each step
    t4 = time.perf_counter()
    result = EpochResult().add({"time_refresh": t1 - t0, "time_gather": t_gathered - t1, "time_gmm": t2 - t_gathered,
                                "time_targets": t3 - t2, "time_knn": t4 - t3}, "time")
    result.add({"clean_fraction": float((clean[plan.unique_ids] > 0.5).mean())}, "noise")
    neighbours = {"neighbour_agreement": (neighbour_agreement(tables.partners, data.train.labels, plan.unique_ids)
                                          if tables.partners is not None else None)}
    if recall is not None:
        neighbours[f"knn_recall_at_{cfg.k}"] = recall
    result.add(neighbours, "neighbours").add(memorisation(stats, data.train), "memorisation")
    if tables.partners is not None:
        result.add({**neighbour_diagnostics(tables.partners, data.train.labels, data.train.true_labels, plan.unique_ids),
                    **anchor_weight_diagnostics(tables.partners, clean, data.train.labels, data.train.true_labels,
                                                plan.unique_ids)}, "neighbours")
    result.reads = stats.reads
    return result.merge(gmm_diagnostics(fit, losses, data.train))


def fit_losses(cfg: Config, losses: np.ndarray, history: np.ndarray | None, seed: int, is_main: bool,
               labels: np.ndarray) -> tuple[np.ndarray | None, np.ndarray, np.ndarray, CleanFit | None]:
    """The gathered [N] losses (`gather_losses`, against `labels`) averaged over the `gmm_loss_window` last
    refreshes (with `gmm_window_scale: normalised`, each refresh's losses min-max scaled before they are
    averaged, as the MixNN and DivideMix authors' code), and the GMM's clean probabilities (`gmm_split`,
    `gmm_scale`): (history, losses, clean, fit)."""
    split, scale = gmm_setting(cfg)
    if cfg.gmm_window_scale == "normalised" and cfg.gmm_loss_window > 1:  # each refresh on [0, 1] first
        seen = ~np.isnan(losses)
        losses = losses.copy()
        losses[seen] = normalise_losses(losses[seen]).astype(np.float32)  # the fit applies `scale` once, after
    history, losses = windowed_losses(history, losses, cfg.gmm_loss_window)
    clean, fit = fit_clean(losses, seed, is_main, labels if split == "class" else None, scale)
    return history, losses, clean, fit


def gather_losses(stats: RefreshStats, labels: np.ndarray) -> np.ndarray:
    """This rank's per-sample losses against `labels` (by id), gathered into one [N] table (NaN: not refreshed)."""
    return gather_by_id(stats.ids, per_sample_loss(stats.probs, labels[stats.ids]).astype(np.float32), len(labels))


def gmm_diagnostics(fit: CleanFit | None, losses: np.ndarray, train: ShardDataset) -> EpochResult:
    """The mixture's scalars and its loss-histogram figure (main process only: `fit` is None elsewhere)."""
    if fit is None:
        return EpochResult()
    seen = ~np.isnan(losses)
    known = (train.true_labels[seen] >= 0).all()
    noisy = (train.labels != train.true_labels)[seen] if known else None
    return EpochResult().add({"gmm_mean_clean": fit.means[0], "gmm_mean_noisy": fit.means[1],
                              "gmm_weight_clean": fit.weights[0]}, "gmm",
                             figures={"gmm/loss_histogram": functools.partial(gmm_figure, fit, noisy)})


def memorisation(stats: RefreshStats, train: ShardDataset) -> dict:
    """Training accuracy against the given labels (un-augmented, eval mode), separately on the truly clean
    and the truly mislabelled samples: the memorisation curves (MixNN paper Fig. 2/7). Summed over ranks."""
    given, true = train.labels[stats.ids], train.true_labels[stats.ids]
    hit = stats.probs.argmax(1) == given
    noisy, known = given != true, true >= 0
    counts = np.array([[(hit & known & ~noisy).sum(), (known & ~noisy).sum(), (hit & noisy & known).sum(),
                        (noisy & known).sum()]], dtype=np.int64)
    total = np.concatenate(all_gather_rows(counts)).sum(0)
    out = {}
    if total[1]:
        out["train_acc_given_truly_clean"] = float(total[0] / total[1])
    if total[3]:
        out["train_acc_given_truly_noisy"] = float(total[2] / total[3])
    return out


def memorisation_pass(cfg: Config, model, data: Data, plan, accelerator) -> EpochResult:
    """A forward-only pass over this rank's share of the epoch's ids, for methods without a refresh pass."""
    if (data.train.true_labels < 0).all():
        return EpochResult()
    stats = refresh_train(cfg, model, data, plan.refresh_slice(accelerator.process_index), accelerator)
    result = EpochResult().add(memorisation(stats, data.train), "memorisation")
    result.reads = stats.reads
    return result


def neighbour_diagnostics(partners: np.ndarray, labels: np.ndarray, true_labels: np.ndarray, ids: np.ndarray) -> dict:
    """Among the truly mislabelled anchors: how often the first neighbour's given label is the anchor's true
    label, how often the neighbour is itself truly clean, and how often it shares the anchor's true class
    (the MixNN paper's Fig. 3 statistic); and the first at chance - how often the given label of a partner
    drawn uniformly from `ids` is the anchor's true label - which is what random partners carry. The table
    is the nearest-neighbour table whatever `partners` a run mixes with."""
    nb = partners[ids, 0]
    ok = (nb >= 0) & (true_labels[ids] >= 0)
    anchors, nb = ids[ok], nb[ok]
    wrong = labels[anchors] != true_labels[anchors]
    if not wrong.any():
        return {}
    a, n = anchors[wrong], nb[wrong]
    given_share = np.bincount(labels[ids], minlength=int(true_labels[a].max()) + 1) / len(ids)
    return {"nn_given_is_anchor_true": float((labels[n] == true_labels[a]).mean()),
            "nn_chance_given_is_anchor_true": float(given_share[true_labels[a]].mean()),
            "nn_truly_clean": float((labels[n] == true_labels[n]).mean()),
            "nn_same_true_class": float((true_labels[n] == true_labels[a]).mean())}


def anchor_weight_diagnostics(partners: np.ndarray, clean: np.ndarray, labels: np.ndarray, true_labels: np.ndarray,
                              ids: np.ndarray) -> dict:
    """What Eq. 10/11's clean-probability weights (`weights: clean`) leave of a truly mislabelled anchor in its
    mixed sample with its neighbours: the mean weight on the anchor's own image, and the share of such anchors
    whose weight is below 0.05 - dropped, their mixed sample being their neighbours with the neighbours'
    targets. A detector that is sure of them turns mixing into replacing them, which any partner can do."""
    ids = ids[(true_labels[ids] >= 0) & (labels[ids] != true_labels[ids])]
    if not len(ids):
        return {}
    # the groups MixNN mixes (a missing neighbour: the anchor itself) and their Eq. 10/11 weights
    group = np.concatenate([ids[:, None], np.where(partners[ids] >= 0, partners[ids], ids[:, None])], 1)
    weights = clean_weights(torch.from_numpy(clean[group]).float()).numpy()
    weight = (weights * (group == ids[:, None])).sum(1)  # the anchor's share of its mixed image
    return {"nn_noisy_anchor_weight": float(weight.mean()), "nn_noisy_anchor_dropped": float((weight < 0.05).mean())}


def refresh_due(cfg: Config, epoch: int, tables: Tables) -> bool:
    """For an epoch after warm-up: every `refresh_every` epochs, and whenever the tables were never refreshed."""
    return tables.clean is None or (epoch - cfg.warmup_epochs) % cfg.refresh_every == 0


def check_tables_identical(tables: Tables, extra: tuple = ()) -> None:
    """Every rank must hold the same per-sample tables (and the `extra` arrays a method keeps by sample id);
    a CRC of each is compared across ranks."""
    targets = tables.targets
    parts = [targets.values.numpy(), targets.classes.numpy() if targets.topk else None, tables.clean,
             tables.partners, *extra]
    # crc32 reads the arrays' buffers in place (no copy of an N x C table)
    digest = np.array([[0 if p is None else zlib.crc32(np.ascontiguousarray(p).view(np.uint8)) for p in parts]],
                      dtype=np.int64)
    everyone = np.concatenate(all_gather_rows(digest))
    if (everyone != everyone[0]).any():
        raise RuntimeError(f"per-sample tables differ between ranks (CRCs {everyone.tolist()})")


def table_metrics(train: ShardDataset, tables: Tables, ids: np.ndarray) -> EpochResult:
    """Label-correction accuracy and noise detection, when true labels are known."""
    result = EpochResult()
    acc = label_correction_accuracy(tables.targets.corrected(), train.true_labels, np.arange(len(train)))
    if acc is not None:
        result.add({"label_correction_accuracy": acc}, "labels")
    if tables.clean is not None:
        result.add(noise_detection(tables.clean, train.labels, train.true_labels, ids), "noise")
    return result
