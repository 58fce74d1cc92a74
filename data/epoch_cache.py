"""Each training image decoded at most once per epoch per node: a bounded, node-shared cache of decoded images.

At Clothing1M or WebVision size no process can hold the decoded split (`ShardDataset.cache_decoded`), and a
method that reads a sample more than once an epoch - the refresh pass, then the training pass; an anchor and
its neighbours; DivideMix's views and its two networks - would decode it each time. The epoch cache keeps,
for the ids of the epoch, each image as the preset's first step makes it (uint8, resized to the preset's
`resize`), in one file-backed shared mapping per node: the first read of an id in the epoch decodes and
stores it, every later read on any rank of the node (and any DataLoader worker) copies it out.

Exact: the stored tensor is what both transforms compute first (`data.transforms.ResizeStep`), and resizing
a tensor already at the size returns it unchanged, so a run gives the same results with and without the
cache. Only presets whose train and eval transforms both start with that resize (`crop: resize_random_crop`:
clothing1m, webvision) use it; a random resized crop reads the full image.

Layout: `slots` fixed-size slots of `slot_bytes` (C x resize x resize for square presets; the shorter side
at `resize` and the longer up to `max_aspect` times it otherwise), and per slot the sample id, a valid flag
and the image's shape. Each epoch assigns slots to its ids (sorted, the first `slots` of them; the same on
every rank, as every rank has the epoch's plan); an id without a slot, or an image too large for one, is
decoded at every read, and counted. What a slot holds is a function of its sample id alone, so an id that
keeps its slot from one epoch to the next (full passes over a split that fits) is not decoded again. No
lock: an id is written by whichever process first misses it; two that miss it at once write the same bytes.

The mapping lives in /dev/shm (else the temporary folder) and is unlinked as soon as every process of the
node has opened it, so a killed run leaves nothing behind.
"""
from __future__ import annotations

import os
import tempfile
import uuid
from pathlib import Path

import numpy as np
import torch

HEADER = 5  # int64 per slot: sample id, valid (1), channels, height, width


def shared_folder() -> Path:
    """Where the node-shared mapping is created: /dev/shm (memory) when present, else the temporary folder."""
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())


def slot_bytes(channels: int, resize: int, square: bool, max_aspect: float = 2.0) -> int:
    """Bytes of one slot: the preset's resized image (the longer side up to `max_aspect` x the shorter)."""
    return channels * resize * (resize if square else int(np.ceil(resize * max_aspect)))


def file_bytes(slots: int, nbytes: int) -> int:
    return 16 + max(slots, 1) * (HEADER * 8 + nbytes)


def fitting_slots(folder: Path, wanted: int, nbytes: int, keep_free: float = 0.1) -> int:
    """At most `wanted` slots, as many as the folder's free space allows (leaving `keep_free` of it)."""
    stat = os.statvfs(folder)
    free = stat.f_bavail * stat.f_frsize * (1 - keep_free)
    return int(max(0, min(wanted, (free - 16) // (HEADER * 8 + nbytes))))


def cache_path(token: str) -> Path:
    return shared_folder() / f"noisymix-epoch-cache-{token}"


def new_token() -> str:
    """A name no other run on the node uses (the main process draws it; every rank is sent the same)."""
    return uuid.uuid4().hex


class EpochCache:
    """Fixed slots of decoded images in a shared file mapping (see the module docstring).

    `EpochCache(path, slots, nbytes)` creates it, once per node; `EpochCache(path)` opens it, in every process
    of the node (before its DataLoader workers fork: they share the mapping); then `unlink()` once all have."""

    def __init__(self, path: str | Path, slots: int | None = None, nbytes: int | None = None):
        self.path = Path(path)
        if slots is not None:  # create, the space reserved (a tmpfs page that cannot be had later is a SIGBUS)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.posix_fallocate(fd, 0, file_bytes(slots, nbytes))
            finally:
                os.close(fd)
            np.memmap(self.path, np.int64, "r+", shape=(2,))[:] = (slots, nbytes)
        meta = np.memmap(self.path, np.int64, "r", shape=(2,))
        self.slots, self.nbytes = int(meta[0]), int(meta[1])
        del meta
        self.header = np.memmap(self.path, np.int64, "r+", offset=16, shape=(max(self.slots, 1), HEADER))
        self.pixels = np.memmap(self.path, np.uint8, "r+", offset=16 + max(self.slots, 1) * HEADER * 8,
                                shape=(max(self.slots, 1), self.nbytes))
        self.slot_of = np.zeros(0, np.int64)  # [N] sample id -> slot of this epoch (-1: none)

    def unlink(self) -> None:
        """Remove the file name (the mapping stays valid in every process that opened it)."""
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    def assign(self, ids: np.ndarray, num_samples: int) -> int:
        """This epoch's slots: the sorted unique `ids`, the first `slots` of them (the same on every rank).
        Returns how many ids got a slot."""
        ids = np.unique(np.asarray(ids, np.int64))[:self.slots]
        self.slot_of = np.full(num_samples, -1, np.int64)
        self.slot_of[ids] = np.arange(len(ids))
        return len(ids)

    def slot(self, sample_id: int) -> int:
        return int(self.slot_of[sample_id]) if 0 <= sample_id < len(self.slot_of) else -1

    def get(self, sample_id: int) -> torch.Tensor | None:
        """The stored image of `sample_id` (a copy), or None."""
        slot = self.slot(sample_id)
        if slot < 0:
            return None
        sid, valid, channels, height, width = (int(v) for v in self.header[slot])
        if sid != sample_id or not valid:
            return None
        pixels = np.array(self.pixels[slot, :channels * height * width])
        return torch.from_numpy(pixels).view(channels, height, width)

    def put(self, sample_id: int, image: torch.Tensor) -> bool:
        """Store a uint8 CHW image for this epoch; False when `sample_id` has no slot or the image does not
        fit one (then it is decoded again at its next read)."""
        slot = self.slot(sample_id)
        if slot < 0 or image.numel() > self.nbytes or image.dtype != torch.uint8 or image.dim() != 3:
            return False
        self.header[slot, 1] = 0  # not valid while it is written
        self.pixels[slot, :image.numel()] = image.contiguous().view(-1).numpy()
        self.header[slot, 0] = sample_id
        self.header[slot, 2:] = image.shape
        self.header[slot, 1] = 1
        return True
