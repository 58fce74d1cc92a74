"""The passes over data: refresh (eval-mode forward by id), the training pass, distributed evaluation."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from data.reader import ShardDataset, id_loader
from index.comm import all_gather_rows

from .metrics import topk_correct
from .models import embed_and_classify


@dataclass
class RefreshStats:
    """This rank's refresh pass: sample ids and their softmax and embeddings."""

    ids: np.ndarray  # [n_local] int64
    probs: np.ndarray  # [n_local, C] float32
    embeddings: np.ndarray  # [n_local, d] float32
    reads: np.ndarray = field(default_factory=lambda: np.zeros(2, np.int64))  # [JPEG decodes, cache reads]


def progress_bar(iterable, desc: str, enabled: bool):
    """tqdm on the main process only (the caller decides), and only when stderr is a terminal."""
    return tqdm(iterable, desc=desc, disable=not enabled or not sys.stderr.isatty(), leave=False)


def batched(ids: np.ndarray, size: int) -> list[np.ndarray]:
    """Consecutive chunks of at most `size` ids."""
    return [ids[i:i + size] for i in range(0, len(ids), size)]


def eval_batch_size(cfg, accelerator) -> int:
    """Per-rank batch of the forward-only passes (refresh, evaluation): twice the training share."""
    return max(cfg.batch_size // accelerator.num_processes, 1) * 2


@torch.no_grad()
def refresh(model, dataset: ShardDataset, batches: list[np.ndarray], accelerator, workers: int,
            progress: bool = False) -> RefreshStats:
    """Eval-mode forward over this rank's id `batches` (no augmentation): softmax and embeddings per id."""
    model.eval()
    n = sum(len(b) for b in batches)  # rows are written in place (allocated at the first batch): the n x d
    out_ids, probs, embeddings, filled = np.zeros(n, np.int64), None, None, 0  # embeddings are never held twice
    reads = np.zeros(2, np.int64)
    loader = id_loader(dataset, batches, workers)
    for batch in progress_bar(loader, "refresh", progress):
        reads += (batch["decoded"], batch["from_cache"])
        if batch["images"] is None:
            continue
        keep = batch["valid"]
        with accelerator.autocast():
            features, logits = embed_and_classify(model, dataset.to_device(batch["images"][keep], accelerator.device))
        if probs is None:
            probs = np.zeros((n, logits.shape[1]), np.float32)
            embeddings = np.zeros((n, features.shape[1]), np.float32)
        end = filled + int(keep.sum())
        out_ids[filled:end] = batch["ids"][keep].numpy()
        probs[filled:end] = torch.softmax(logits.float(), 1).cpu().numpy()
        embeddings[filled:end] = features.float().cpu().numpy()
        filled = end
    if probs is None:
        empty = np.zeros((0,), np.int64)
        return RefreshStats(empty, np.zeros((0, model.get_classifier().out_features), np.float32),
                            np.zeros((0, model.num_features), np.float32), reads)
    if filled < n:  # unreadable samples were skipped (the copy is as small as they are rare)
        return RefreshStats(out_ids[:filled].copy(), probs[:filled].copy(), embeddings[:filled].copy(), reads)
    return RefreshStats(out_ids, probs, embeddings, reads)


def zero_loss_step(model, shape, accelerator) -> torch.Tensor:
    """A zero loss through the model so DDP's gradient all-reduce still runs when a batch was all skipped."""
    return model(torch.zeros(shape, device=accelerator.device)).sum() * 0.0


class Diverged(RuntimeError):
    """The training loss became non-finite on some rank; raised on every rank before the step is applied."""

    def __init__(self, step: int, value: float):
        super().__init__(f"non-finite training loss ({value}) at step {step}")
        self.step, self.value = step, value


def step_flags(loss: torch.Tensor, stop) -> tuple[bool, bool]:
    """(some rank's loss is not finite, some rank asked to stop): one all-reduce of two flags per step."""
    flags = torch.tensor([0.0 if bool(torch.isfinite(loss.detach()).all()) else 1.0,
                          1.0 if stop is not None and stop.requested else 0.0])
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if torch.distributed.get_backend() == "nccl":
            flags = flags.cuda()
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
    return bool(flags[0] > 0), bool(flags[1] > 0)


def train_one_epoch(ctx, optimizer, step_loss, loader, stop=None) -> dict:
    """One pass over the loader of the epoch of `ctx` (a train.methods.EpochContext: model, accelerator, input
    shape, first step): `step_loss(batch, step)` -> (loss, images it counts) or (None, 0), SGD step.

    A batch with no readable image still takes a zero-loss step, so DDP's all-reduce runs on every rank.
    Before each backward pass the ranks agree on two flags: a non-finite loss anywhere raises `Diverged` on
    every rank (the weights keep the last finite step), and a `stop` request ends the pass after this step;
    `stopped_at` is then the next step to run.
    """
    model, accelerator, start_step = ctx.model, ctx.accelerator, ctx.start_step
    progress = ctx.cfg.progress and accelerator.is_local_main_process
    model.train()
    total, count, skipped, wait, t0 = 0.0, 0, 0, 0.0, time.perf_counter()
    unreadable, reads = set(), np.zeros(2, np.int64)
    fetched, stopped_at = time.perf_counter(), None
    for step, batch in enumerate(progress_bar(loader, "train", progress), start_step):
        wait += time.perf_counter() - fetched
        skipped += batch["skipped"]
        unreadable.update(batch["skipped_ids"])
        reads += (batch["decoded"], batch["from_cache"])
        loss, n = None, 0
        with accelerator.autocast():
            if batch["images"] is not None and batch["valid"].any():
                batch["images"] = loader.dataset.to_device(batch["images"], accelerator.device)
                loss, n = step_loss(batch, step)
            if loss is None:
                loss = zero_loss_step(model, (2, *ctx.data.input_shape), accelerator)
        nonfinite, stopping = step_flags(loss, stop)
        if nonfinite:
            raise Diverged(step, loss.item())
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        optimizer.step()
        total += loss.item() * n
        count += n
        if stopping:
            stopped_at = step + 1
            break
        fetched = time.perf_counter()
    seconds = time.perf_counter() - t0
    return {"train_loss": total / max(count, 1), "train_images": count, "train_seconds": seconds,
            "data_wait_seconds": wait, "skipped_train": skipped, "stopped_at": stopped_at,
            "unreadable_ids": np.array(sorted(unreadable), dtype=np.int64), "reads": reads}


@torch.no_grad()
def evaluate(model, dataset: ShardDataset, accelerator, batch_size: int, workers: int) -> dict:
    """Top-1/top-5 over a whole split, distributed; checks that every sample was counted exactly once."""
    model.eval()
    rank, world = accelerator.process_index, accelerator.num_processes
    ids = np.array_split(np.arange(len(dataset)), world)[rank]
    rows, corrupt = [], 0
    for batch in id_loader(dataset, batched(ids, batch_size), workers):
        corrupt += batch["skipped"]
        if batch["images"] is None:
            continue
        keep = batch["valid"]
        with accelerator.autocast():
            logits = model(dataset.to_device(batch["images"][keep], accelerator.device)).float().cpu().numpy()
        labels = batch["labels"][keep].numpy()
        rows.append(np.stack([batch["ids"][keep].numpy(), topk_correct(logits, labels, 1),
                              topk_correct(logits, labels, 5)], 1))
    local = np.concatenate(rows) if rows else np.zeros((0, 3), np.int64)  # [n, 3] id, top-1 hit, top-5 hit
    everyone = np.concatenate(all_gather_rows(local))  # one gather: ids and hits travel together
    seen = np.full((len(dataset), 2), np.nan, dtype=np.float32)
    seen[everyone[:, 0]] = everyone[:, 1:]
    corrupt = int(np.concatenate(all_gather_rows(np.array([corrupt]))).sum())
    return summarise_eval(seen, len(dataset), everyone[:, 0], corrupt)


def summarise_eval(seen: np.ndarray, size: int, all_ids: np.ndarray, corrupt: int = 0) -> dict:
    """Accuracies over the evaluated ids. Raises when a sample was counted twice (a padded sampler) or
    when evaluated + unreadable samples do not add up to the split size (a dropping sampler)."""
    if len(all_ids) != len(np.unique(all_ids)):
        raise RuntimeError(f"evaluation counted {len(all_ids) - len(np.unique(all_ids))} samples twice "
                           f"({len(all_ids)} rows for {size} samples): a padded sampler duplicated them")
    done = ~np.isnan(seen[:, 0])
    if done.sum() + corrupt != size:
        raise RuntimeError(f"evaluated {int(done.sum())} + {corrupt} unreadable samples != split size {size}: "
                           "the sampler dropped samples")
    return {"top1": float(seen[done, 0].mean() * 100) if done.any() else 0.0,
            "top5": float(seen[done, 1].mean() * 100) if done.any() else 0.0,
            "evaluated": int(done.sum()), "skipped": int(size - done.sum())}
