"""The node-shared epoch cache: slots by sample id, shared with forked processes, bounded, exact."""
import multiprocessing as mp

import numpy as np
import torch

from data.epoch_cache import EpochCache, file_bytes, fitting_slots, slot_bytes
from data.transforms import EvalTransform, ResizeStep, TrainTransform, caches_resized, get_preset


def test_slots_hold_images_by_id_and_refuse_what_does_not_fit(tmp_path):
    cache = EpochCache(tmp_path / "c", slots=2, nbytes=3 * 4 * 4)
    assert cache.assign(np.array([7, 3, 9, 3]), 10) == 2  # sorted unique ids, the first `slots`: 3 and 7
    image = torch.arange(48, dtype=torch.uint8).view(3, 4, 4)
    assert cache.get(3) is None and cache.put(3, image) and torch.equal(cache.get(3), image)
    assert not cache.put(9, image) and cache.get(9) is None  # no slot for 9 this epoch
    assert not cache.put(7, torch.zeros(3, 5, 5, dtype=torch.uint8))  # larger than a slot
    other = EpochCache(tmp_path / "c")  # another process of the node opens the same file
    other.assign(np.array([3, 7]), 10)
    assert torch.equal(other.get(3), image)
    cache.assign(np.array([0, 7]), 10)  # next epoch: slot 0 now belongs to id 0; its content is still id 3's
    assert cache.get(0) is None
    cache.unlink()
    assert not (tmp_path / "c").exists() and torch.equal(other.get(3), image)  # the mapping outlives the name


def _child_put(cache, queue):
    cache.put(5, torch.full((1, 2, 2), 9, dtype=torch.uint8))
    queue.put(True)


def test_a_forked_worker_writes_what_the_parent_reads(tmp_path):
    cache = EpochCache(tmp_path / "c", slots=4, nbytes=4)
    cache.assign(np.arange(6), 6)
    cache.unlink()  # as a run does, before any worker forks
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_put, args=(cache, queue))
    child.start()
    child.join(30)
    assert queue.get(timeout=5) and cache.get(5) is None  # id 5 has no slot (4 slots: ids 0-3)
    cache.assign(np.array([5]), 6)
    child = ctx.Process(target=_child_put, args=(cache, queue))
    child.start()
    child.join(30)
    assert queue.get(timeout=5) and torch.equal(cache.get(5), torch.full((1, 2, 2), 9, dtype=torch.uint8))


def test_the_stored_step_leaves_both_transforms_exact():
    """The resized image the cache stores gives, through either transform, what the full image gives."""
    from PIL import Image

    for name in ("clothing1m", "webvision"):
        preset = get_preset(name, 16)
        assert caches_resized(preset)
        image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (37, 53, 3), dtype=np.uint8))
        stored = ResizeStep(preset=preset)(image)
        assert stored.numel() <= slot_bytes(3, preset.resize, preset.square)
        assert torch.equal(EvalTransform(preset=preset)(image), EvalTransform(preset=preset)(stored))
        torch.manual_seed(1)
        full = TrainTransform(preset=preset)(image)
        torch.manual_seed(1)
        assert torch.equal(full, TrainTransform(preset=preset)(stored))
    assert not caches_resized(get_preset("imagenet")) and not caches_resized(get_preset("cifar10"))


def test_the_file_is_reserved_within_the_folder_free_space(tmp_path):
    assert fitting_slots(tmp_path, 10, 1000) == 10
    assert fitting_slots(tmp_path, 10**15, 1000) < 10**15  # never more than the disk holds
    EpochCache(tmp_path / "c", slots=3, nbytes=1000)
    assert (tmp_path / "c").stat().st_size == file_bytes(3, 1000)


def test_reduced_size_decoding_stays_within_its_stated_tolerance(tmp_path):
    """`draft_size` (decode_draft: auto) on real photographs at 2-5x the resize: each resized image's mean
    difference from the full decode's below 2.7 of 255 grey levels (the 95th percentile docs/data.md states);
    square presets keep the shape, shorter-side presets the shorter side (the longer within one pixel)."""
    from conftest import run_module
    from PIL import Image
    from sklearn.datasets import load_sample_images

    from data.reader import ShardDataset
    from data.transforms import draft_for

    for i, photo in enumerate(load_sample_images().images):
        img = Image.fromarray(photo).resize((1400, 934), Image.BICUBIC)
        (tmp_path / "raw" / f"c{i}").mkdir(parents=True)
        img.save(tmp_path / "raw" / f"c{i}" / "a.jpg", quality=90)
    assert run_module("data.prepare", "folder", "--root", tmp_path / "raw", "--out", tmp_path / "s").returncode == 0
    for name in ("clothing1m", "webvision"):
        preset = get_preset(name)
        full, draft = ShardDataset(tmp_path / "s" / "train"), ShardDataset(tmp_path / "s" / "train")
        draft.draft_size = draft_for(preset)
        step = ResizeStep(preset=preset)
        for sid in range(len(full)):
            a, b = step(full.load_image(sid)), step(draft.load_image(sid))
            assert draft.load_image(sid).size[0] <= 1400 // 2  # decoded at reduced size
            if preset.square:
                assert a.shape == b.shape
            else:
                assert a.shape[1] == b.shape[1] == 256 and abs(a.shape[2] - b.shape[2]) <= 1
                width = min(a.shape[2], b.shape[2])
                a, b = a[..., :width], b[..., :width]
            assert (a.int() - b.int()).abs().float().mean() < 2.7
    assert draft_for(get_preset("imagenet")) is None and draft_for(get_preset("digits")) is None


def test_jpegs_decode_to_the_same_pixels_through_torchvision_io(tmp_path):
    """`ShardDataset.decode` hands JPEGs that draft would not shrink to torchvision.io.decode_jpeg: the same
    pixels as PIL's decode, in RGB and in L; a damaged JPEG still fails (and is skipped by the loader)."""
    from conftest import run_module, write_jpeg
    from torchvision.transforms.v2 import functional as F

    from data.reader import ShardDataset

    from PIL import Image

    for i in range(6):
        write_jpeg(tmp_path / "rgb" / f"c{i % 2}" / f"{i}.jpg", i, size=(40 + 7 * i, 30 + 5 * i))
        grey = np.random.default_rng(i).integers(0, 255, (30 + 5 * i, 40 + 7 * i), dtype=np.uint8)
        (tmp_path / "grey" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(grey, "L").save(tmp_path / "grey" / f"c{i % 2}" / f"{i}.jpg", quality=85)
    for kind, mode in (("rgb", "RGB"), ("grey", "L")):
        assert run_module("data.prepare", "folder", "--root", tmp_path / kind, "--out", tmp_path / kind / "s"
                          ).returncode == 0
        ds = ShardDataset(tmp_path / kind / "s" / "train", mode=mode)
        for sid in range(len(ds)):
            fast = ds.decode(sid)
            assert isinstance(fast, torch.Tensor) and torch.equal(fast, F.pil_to_tensor(ds.load_image(sid)))
    mixed = ShardDataset(tmp_path / "rgb" / "s" / "train", mode="L")  # an RGB JPEG in a grey split: PIL converts
    assert isinstance(mixed.decode(0), Image.Image)
    ds = ShardDataset(tmp_path / "rgb" / "s" / "train")
    ds.read_bytes = lambda sid: ShardDataset.read_bytes(ds, sid)[:200]  # a JPEG cut short
    assert ds[0][0] is None and ds.read_error(0)
