"""Random access to prepared shards by sample id.

Why not wids here: `wids.ShardListDataset` copies local shards into a cache folder unless told not to,
its open-shard LRU is not thread-safe once it evicts and collapses to ~1% throughput when a random
sampler touches more shards than it holds, and spawned workers fail after the parent used it. The
shards already carry everything needed for an offset table (`data.shards.build_offset_table`), so this
reader does one `os.pread` per sample on descriptors opened lazily per process: no shared file
position, safe with threads and with forked or spawned DataLoader workers, shards read in place.
The `index.json` beside the shards stays a valid wids index for users who prefer wids.
"""
from __future__ import annotations

import copy
import io
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

try:  # deprecated since torchvision 0.29 (to be superseded by TorchCodec): without it PIL decodes every JPEG
    from torchvision.io import ImageReadMode, decode_jpeg
except ImportError:
    ImageReadMode = decode_jpeg = None

from .images import convert_image
from .shards import load_offset_table

logger = logging.getLogger(__name__)
MAX_OPEN_SHARDS = 256
JPEG_MODES = {"RGB": ImageReadMode.RGB, "L": ImageReadMode.GRAY} if decode_jpeg else {}  # split mode -> decode_jpeg's
warnings.filterwarnings("ignore", "The image decoding and encoding capabilities of TorchVision are deprecated",
                        DeprecationWarning)  # said once in docs/data.md, not at every worker's first image


class ShardDataset(torch.utils.data.Dataset):
    """Map-style dataset over one prepared split: `ds[sample_id] -> (image, label, sample_id)`.

    A sample whose image cannot be read or decoded gives `None` (the collate function skips and
    counts it). `labels`, `true_labels` and `sources` are per-sample-id arrays.
    """

    def __init__(self, split_dir: str | Path, transform=None, mode: str = "RGB", table: dict | None = None):
        self.split_dir = Path(split_dir)
        table = load_offset_table(self.split_dir) if table is None else table  # verify_split returns one
        self.shard_paths = [str(self.split_dir / name) for name in table["shard_names"]]
        self.shard = table["shard"]
        self.offset = table["offset"]
        self.size = table["size"]
        self.labels = table["label"]  # [n] int64, given (possibly noisy) labels
        self.true_labels = table["true_label"]  # [n] int64, -1 where unknown
        self.sources = table["source"]
        self.transform = transform
        self.mode = mode
        self._fds: dict[int, int] = {}
        self._pid = None
        self._pixels = None  # decoded-image cache (see cache_decoded)
        self.epoch_cache = None  # node-shared cache of this epoch's decoded images (data.epoch_cache), when set
        self.cache_step = None  # ... and the first step of the transforms, whose output it stores
        self.reads = np.zeros(2, np.int64)  # this process's reads: [JPEG decodes, reads from a cache]
        self.draft_size = None  # (w, h): decode JPEGs at the smallest DCT scale still at least this (PIL draft)

    def with_transform(self, transform) -> "ShardDataset":
        """The same split (tables and decoded-image cache shared, not copied) under another transform."""
        view = copy.copy(self)
        view.transform, view._fds, view._pid, view.reads = transform, {}, None, np.zeros(2, np.int64)
        view.epoch_cache = self.epoch_cache  # (copy goes through __getstate__, which drops it for pickling)
        return view

    def to_device(self, images: torch.Tensor, device) -> torch.Tensor:
        """A collated batch of this dataset as the model's input on `device`: the transform's `to_device`
        (data.transforms.Normalising: uint8 batches are normalised there), else moved as it is."""
        if hasattr(self.transform, "to_device"):
            return self.transform.to_device(images, device)
        return images.to(device, non_blocking=True)

    @property
    def cached(self) -> bool:
        return self._pixels is not None

    @property
    def cache_bytes(self) -> int:
        return 0 if self._pixels is None else int(self._pixels.nbytes)

    def cache_decoded(self, max_bytes: int) -> bool:
        """Decode every image once into memory: one uint8 buffer (CHW per sample) plus offsets, so later
        reads skip the shard and the decoder. One flat buffer rather than a list of objects: forked
        DataLoader workers share its pages instead of copying them as reference counts change.

        Returns False and caches nothing when the decoded split would take more than `max_bytes` (estimated
        from the first 32 images, then checked while decoding). An unreadable image is remembered and
        reads of it keep returning None (skipped and counted by the collate function, as without cache).
        """
        n = len(self)
        probe = [self._decode_array(i) for i in range(min(n, 32))]
        probe_bytes = [a.nbytes for a, _ in probe if a is not None]
        if probe_bytes and np.mean(probe_bytes) * n > max_bytes:
            return False
        arrays, errors, total = [], {}, 0
        for i in range(n):
            array, error = probe[i] if i < len(probe) else self._decode_array(i)
            if array is None:
                errors[i] = error
                array = np.zeros((0, 0, 0), np.uint8)
            total += array.nbytes
            if total > max_bytes:
                return False
            arrays.append(array)
        shapes = np.array([a.shape for a in arrays], dtype=np.int64)
        sizes = shapes.prod(1)
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        self._pixels = np.concatenate([a.reshape(-1) for a in arrays]) if total else np.zeros(0, np.uint8)
        self._pixel_offsets, self._pixel_shapes, self._cache_errors = offsets, shapes, errors
        logger.info("%s: %d images decoded into memory (%.1f MB, %d unreadable)", self.split_dir, n, total / 2**20,
                    len(errors))
        return True

    def read_error(self, sample_id: int) -> str:
        """Why a sample cannot be read ("" when it can)."""
        return self._decode_array(sample_id)[1]

    def _decode_array(self, sample_id: int) -> tuple[np.ndarray | None, str]:
        """(uint8 CHW array of one image, "") or (None, the reason) when it cannot be read."""
        try:
            array = np.asarray(self.load_image(sample_id))
        except Exception as e:
            return None, f"{type(e).__name__}: {e}"
        return np.ascontiguousarray(array[None] if array.ndim == 2 else array.transpose(2, 0, 1)), ""

    def use_epoch_cache(self, cache, step) -> None:
        """Read through a node-shared epoch cache (`data.epoch_cache.EpochCache`) that stores `step(image)`
        (uint8 CHW, the transforms' first step) for this split's ids; every view shares it."""
        self.epoch_cache, self.cache_step = cache, step

    def decode(self, sample_id: int):
        """One sample's image for the transforms: a JPEG that reduced-size decoding would not shrink, in the
        split's mode, is decoded by `torchvision.io.decode_jpeg` straight into a uint8 CHW tensor (libjpeg-turbo:
        the same pixels as PIL's decode, tested, 1.3x faster on 256-px JPEGs and no PIL-to-tensor copy);
        anything else through PIL (`load_image`)."""
        data = self.read_bytes(sample_id)
        with Image.open(io.BytesIO(data)) as img:
            fast = img.format == "JPEG" and img.mode == self.mode and self.mode in JPEG_MODES and not (
                self.draft_size is not None and min(s // d for s, d in zip(img.size, self.draft_size)) >= 2)
            if not fast:
                return self.pil_decode(img)
        return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=JPEG_MODES[self.mode])

    def decoded(self, sample_id: int):
        """The decoded image: a uint8 CHW tensor from a cache, else a PIL image read from the shard (or, with
        an epoch cache, its `cache_step` output, stored for the epoch's next reads)."""
        if self._pixels is None:
            cache = self.epoch_cache
            if cache is None:
                self.reads[0] += 1
                return self.decode(sample_id)
            image = cache.get(sample_id)
            if image is not None:
                self.reads[1] += 1
                return image
            image = self.cache_step(self.decode(sample_id))
            self.reads[0] += 1
            cache.put(sample_id, image)
            return image
        self.reads[1] += 1
        shape = self._pixel_shapes[sample_id]
        if shape[0] == 0:
            raise OSError(self._cache_errors[sample_id])
        start = self._pixel_offsets[sample_id]
        return torch.from_numpy(self._pixels[start:start + int(shape.prod())]).view(*shape.tolist())

    def __len__(self) -> int:
        return len(self.labels)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_fds"], state["_pid"] = {}, None  # descriptors never cross a process boundary
        state["epoch_cache"] = None  # nor does a mapping whose file is unlinked: a spawned worker decodes
        return state

    def _fd(self, shard: int) -> int:
        if self._pid != os.getpid():  # forked child: the parent's descriptors are not ours to share
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.get(shard)
        if fd is None:
            if len(self._fds) >= MAX_OPEN_SHARDS:
                self.close()
                self._pid = os.getpid()
            fd = self._fds[shard] = os.open(self.shard_paths[shard], os.O_RDONLY)
        return fd

    def close(self) -> None:
        """Close every open shard descriptor of this process."""
        if self._pid == os.getpid():
            for fd in self._fds.values():
                os.close(fd)
        self._fds = {}

    def read_bytes(self, sample_id: int) -> bytes:
        """The encoded image bytes of one sample."""
        size = int(self.size[sample_id])
        data = os.pread(self._fd(int(self.shard[sample_id])), size, int(self.offset[sample_id]))
        if len(data) != size:
            raise OSError(f"short read ({len(data)} of {size} bytes)")
        return data

    def load_image(self, sample_id: int) -> Image.Image:
        """Decode one sample's image in `self.mode`; with `draft_size`, a JPEG at least twice that size in both
        sides is decoded at 1/2, 1/4 or 1/8 scale by libjpeg (the largest reduction that keeps both sides at
        least `draft_size`): far fewer pixels to decode and to resize, not bit-exact (data.transforms.draft_for)."""
        with Image.open(io.BytesIO(self.read_bytes(sample_id))) as img:
            return self.pil_decode(img)

    def pil_decode(self, img: Image.Image) -> Image.Image:
        """An opened image decoded in `self.mode` (at reduced size for a JPEG, with `draft_size`)."""
        if self.draft_size is not None and img.format == "JPEG":
            img.draft(self.mode, self.draft_size)
        return convert_image(img, self.mode)

    def __getitem__(self, sample_id):
        sample_id = int(sample_id)
        try:
            image = self.decoded(sample_id)
        except Exception as e:  # a damaged shard must never crash a long run: skip and count
            logger.warning("%s: sample id %d skipped (%s: %s)", self.split_dir, sample_id, type(e).__name__, e)
            return None, -1, sample_id
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[sample_id]), sample_id

    def __getitems__(self, sample_ids) -> list:
        """One batch (DataLoader's batched fetch). A batch that carries a `seed` (`SeededIds`) draws its
        augmentation from a CPU generator seeded by it, leaving the global RNG as it was: the draws depend
        on (run seed, epoch, rank, step) only, the same with 0 or 8 workers and different on every rank."""
        seed, before = getattr(sample_ids, "seed", None), self.reads.copy()
        if seed is None:
            samples = Samples(self[i] for i in sample_ids)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                samples = Samples(self[i] for i in sample_ids)
        samples.reads = self.reads - before
        return samples


class Samples(list):
    """One batch's samples and how they were read (`reads`: [JPEG decodes, cache reads]); DataLoader workers
    pass it to the collate function, which counts them in the batch."""

    reads = np.zeros(2, np.int64)


def collate_with_skips(samples: list) -> dict:
    """Stack samples; an unreadable one (image None) keeps its place with `valid=False` and a zero image,
    and its sample id is listed in `skipped_ids`."""
    ok = [s[0] is not None for s in samples]
    skipped_ids = [s[2] for s, good in zip(samples, ok) if not good]
    if not any(ok):
        return {"images": None, "labels": None, "ids": None, "valid": torch.zeros(len(samples), dtype=torch.bool),
                "skipped": len(samples), "skipped_ids": skipped_ids, **read_counts(samples)}
    template = torch.zeros_like(next(s[0] for s, good in zip(samples, ok) if good))
    images = torch.stack([s[0] if good else template for s, good in zip(samples, ok)])
    labels = torch.tensor([s[1] if good else -1 for s, good in zip(samples, ok)], dtype=torch.long)
    ids = torch.tensor([s[2] if good else -1 for s, good in zip(samples, ok)], dtype=torch.long)
    return {"images": images, "labels": labels, "ids": ids, "valid": torch.tensor(ok, dtype=torch.bool),
            "skipped": len(skipped_ids), "skipped_ids": skipped_ids, **read_counts(samples)}


def read_counts(samples: list) -> dict:
    """A batch's image reads: `decoded` (JPEG decodes) and `from_cache` (in-memory or epoch cache)."""
    decoded, from_cache = (int(v) for v in getattr(samples, "reads", (0, 0)))
    return {"decoded": decoded, "from_cache": from_cache}


class SeededIds(list):
    """A batch's sample ids and the seed of its augmentation draws (travels to DataLoader workers)."""

    def __init__(self, ids, seed: int):
        super().__init__(ids)
        self.seed = seed


def batch_seed(seed: int, step: int) -> int:
    """The augmentation seed of batch `step` under a loader seed (hashed: no two (seed, step) pairs collide
    the way seed + step would between neighbouring ranks)."""
    return int(np.random.SeedSequence([seed, step]).generate_state(1, np.uint64)[0] >> 1)


class IdBatchSampler(torch.utils.data.Sampler):
    """Yields precomputed lists of sample ids (one list per step) for a map-style `ShardDataset`; with a
    seed each list is a `SeededIds` whose seed depends on (seed, position)."""

    def __init__(self, batches: list[np.ndarray], seed: int | None = None, first_step: int = 0):
        self.batches, self.seed, self.first_step = batches, seed, first_step

    def __iter__(self):
        if self.seed is None:
            return (b.tolist() for b in self.batches)
        return (SeededIds(b.tolist(), batch_seed(self.seed, self.first_step + i))
                for i, b in enumerate(self.batches))

    def __len__(self) -> int:
        return len(self.batches)


def id_loader(dataset: ShardDataset, batches: list[np.ndarray], workers: int = 0, seed: int | None = None,
              first_step: int = 0):
    """DataLoader reading the given id batches. With a `seed` (training), batch i's augmentation is drawn
    from `batch_seed(seed, first_step + i)` whatever the number of workers (a run resumed at step s passes
    first_step = s); without one (evaluation) nothing is random."""
    generator = torch.Generator().manual_seed(0 if seed is None else seed)
    return torch.utils.data.DataLoader(dataset, batch_sampler=IdBatchSampler(batches, seed, first_step), num_workers=workers,
                                       collate_fn=collate_with_skips, generator=generator,
                                       persistent_workers=False, pin_memory=torch.cuda.is_available(),
                                       multiprocessing_context="fork" if workers and os.name == "posix" else None)
