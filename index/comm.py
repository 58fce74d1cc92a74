"""Small collective helpers over torch.distributed that also work in a single process (no init).

Every function is called by all ranks in the same order. Tensors travel as float32/int64 because gloo
does not reduce or gather every dtype.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def device() -> torch.device:
    """The device collectives use: CUDA for NCCL, CPU for gloo."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_rows(local: np.ndarray) -> list[np.ndarray]:
    """Each rank's array (same trailing shape and dtype, any number of rows), in rank order, on every rank."""
    rank, size = world()
    if size == 1:
        return [local]
    counts = torch.tensor([len(local)], dtype=torch.int64, device=device())
    all_counts = [torch.zeros_like(counts) for _ in range(size)]
    dist.all_gather(all_counts, counts)
    rows = [int(c.item()) for c in all_counts]
    padded = np.zeros((max(rows), *local.shape[1:]), dtype=local.dtype)
    padded[: len(local)] = local
    tensor = torch.from_numpy(padded).to(device())
    parts = [torch.empty_like(tensor) for _ in range(size)]
    dist.all_gather(parts, tensor)  # equal sizes: gloo aborts on unequal all_gather
    return [p[:n].cpu().numpy() for p, n in zip(parts, rows)]


def broadcast_array(array: np.ndarray | None, src: int, shape_dtype=None) -> np.ndarray:
    """Broadcast a numpy array from `src`; other ranks pass None (shape and dtype travel first)."""
    rank, size = world()
    if size == 1:
        return array
    header = [None if array is None else (array.shape, array.dtype.str)]
    dist.broadcast_object_list(header, src=src, device=device())
    shape, dtype = header[0]
    tensor = torch.from_numpy(np.ascontiguousarray(array)) if rank == src else torch.empty(shape, dtype=_torch_dtype(dtype))
    tensor = tensor.to(device())
    dist.broadcast(tensor, src=src)
    return tensor.cpu().numpy()


def _torch_dtype(numpy_dtype: str) -> torch.dtype:
    return torch.from_numpy(np.zeros(0, dtype=numpy_dtype)).dtype


def gather_by_id(ids: np.ndarray, values: np.ndarray, num_samples: int, fill=np.nan) -> np.ndarray:
    """Scatter every rank's (ids, values) into one table of `num_samples` rows, identical on all ranks.

    Rows no rank provided keep `fill`. Duplicate ids (padding) carry identical values, so the last wins.
    """
    all_ids = np.concatenate(all_gather_rows(np.asarray(ids, dtype=np.int64)))
    all_values = np.concatenate(all_gather_rows(np.asarray(values)))
    table = np.full((num_samples, *all_values.shape[1:]), fill, dtype=all_values.dtype)
    table[all_ids] = all_values
    return table
