"""The fast transform paths draw and compute exactly what torchvision's v2 Compose does."""
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2 as T

from data.transforms import EvalTransform, TrainTransform, get_preset, resize_size


def reference_train(preset):
    flips = [T.RandomHorizontalFlip()] if preset.hflip else []
    return T.Compose([T.PILToTensor(), T.RandomCrop(preset.size, padding=preset.padding), *flips,
                      T.ToDtype(torch.float32, scale=True), T.Normalize(preset.mean, preset.std)])


def reference_eval(preset):
    return T.Compose([T.PILToTensor(), T.Resize(resize_size(preset), antialias=True), T.CenterCrop(preset.size),
                      T.ToDtype(torch.float32, scale=True), T.Normalize(preset.mean, preset.std)])


def images(mode, shape, n=20):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode) for _ in range(n)]


@pytest.mark.parametrize("name,mode,shape", [("digits", "L", (8, 8)), ("cifar10", "RGB", (32, 32, 3)),
                                             ("cifar100", "RGB", (30, 34, 3))])
def test_padded_crop_equals_v2(name, mode, shape):
    preset = get_preset(name)
    fast, reference = TrainTransform(preset=preset), reference_train(preset)
    for image in images(mode, shape):
        torch.manual_seed(3)
        expected = reference(image)
        torch.manual_seed(3)
        got = fast(image)
        torch.manual_seed(3)
        from_tensor = fast(torch.from_numpy(np.array(image)).reshape(*shape[:2], -1).permute(2, 0, 1))
        assert torch.equal(got, expected) and torch.equal(from_tensor, expected)


def test_padded_crop_draws_vary_and_follow_the_seed():
    fast = TrainTransform(preset=get_preset("cifar10"))
    image = images("RGB", (32, 32, 3), 1)[0]
    torch.manual_seed(0)
    a = [fast(image) for _ in range(5)]
    torch.manual_seed(0)
    b = [fast(image) for _ in range(5)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(a[0], x) for x in a[1:])


@pytest.mark.parametrize("name,shape", [("digits", (8, 8)), ("clothing1m", (300, 260, 3)),
                                        ("webvision", (256, 256, 3)), ("cifar10", (32, 32, 3))])
def test_eval_equals_v2(name, shape):
    preset = get_preset(name)
    mode = "L" if len(shape) == 2 else "RGB"
    for image in images(mode, shape, 3):
        expected = reference_eval(preset)(image)
        assert torch.equal(EvalTransform(preset=preset)(image), expected)
        tensor = torch.from_numpy(np.array(image)).reshape(*shape[:2], -1).permute(2, 0, 1)
        assert torch.equal(EvalTransform(preset=preset)(tensor), expected)


def test_crop_larger_than_padded_image_is_an_error():
    with pytest.raises(ValueError, match="larger than the padded image"):
        TrainTransform(preset=get_preset("cifar10"))(torch.zeros(3, 16, 16, dtype=torch.uint8))


@pytest.mark.parametrize("name,size,shape", [("imagenet", 227, (300, 260, 3)), ("synthetic", 64, (64, 64, 3)),
                                             ("imagenet", 32, (40, 50, 3))])
def test_random_resized_crop_equals_v2(name, size, shape):
    preset = get_preset(name, size)
    reference = T.Compose([T.PILToTensor(), T.RandomResizedCrop(preset.size, antialias=True), T.RandomHorizontalFlip(),
                           T.ToDtype(torch.float32, scale=True), T.Normalize(preset.mean, preset.std)])
    fast = TrainTransform(preset=preset)
    for seed, image in enumerate(images("RGB", shape, 6)):
        torch.manual_seed(seed)
        expected = reference(image)
        torch.manual_seed(seed)
        assert torch.equal(fast(image), expected)


@pytest.mark.parametrize("name", ["clothing1m", "webvision"])
def test_resize_then_random_crop_equals_v2(name):
    preset = get_preset(name)  # Clothing1M: 256x256 (the MixNN paper), WebVision: shorter side 256, then crops
    assert preset.square == (name == "clothing1m")
    reference = T.Compose([T.PILToTensor(), T.Resize(resize_size(preset), antialias=True), T.RandomCrop(preset.size),
                           T.RandomHorizontalFlip(), T.ToDtype(torch.float32, scale=True),
                           T.Normalize(preset.mean, preset.std)])
    fast = TrainTransform(preset=preset)
    for seed, image in enumerate(images("RGB", (300, 260, 3), 4)):
        torch.manual_seed(seed)
        expected = reference(image)
        torch.manual_seed(seed)
        assert torch.equal(fast(image), expected)


@pytest.mark.parametrize("name,shape", [("digits", (8, 8)), ("clothing1m", (300, 260, 3)), ("webvision", (260, 300, 3))])
def test_uint8_batches_normalised_on_the_device_equal_the_transforms_own(name, shape):
    """normalise=False keeps the crop uint8 (a quarter of the bytes); to_device gives the same float32 batch."""
    preset = get_preset(name)
    mode = "L" if len(shape) == 2 else "RGB"
    for cls in (TrainTransform, EvalTransform):
        here, there = cls(preset=preset), cls(preset=preset, normalise=False)
        torch.manual_seed(5)
        expected = torch.stack([here(image) for image in images(mode, shape, 4)])
        torch.manual_seed(5)
        raw = torch.stack([there(image) for image in images(mode, shape, 4)])
        assert raw.dtype == torch.uint8 and expected.dtype == torch.float32
        assert torch.equal(there.to_device(raw, "cpu"), expected)
        assert there.to_device(expected, "cpu") is expected  # an already normalised batch passes unchanged
