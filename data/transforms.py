"""Transforms as small keyword-only classes (after torchvision's references/classification/presets.py)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as F


@dataclass(frozen=True)
class Preset:
    """Image geometry and normalisation of one data set."""

    size: int  # training / eval crop
    resize: int  # eval: shorter side before the centre crop
    mean: tuple
    std: tuple
    crop: str = "random_resized"  # or "random_crop" (pad + crop, small images)
    padding: int = 0
    hflip: bool = True
    mode: str = "RGB"
    square: bool = False  # resize to resize x resize (aspect not kept) instead of the shorter side to resize


IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
PRESETS = {
    "digits": Preset(8, 8, (0.31,), (0.37,), crop="random_crop", padding=1, hflip=False, mode="L"),
    # 28x28 grey; clothes are left-right symmetric, digits are not
    "fashion-mnist": Preset(28, 28, (0.2860,), (0.3530,), crop="random_crop", padding=2, mode="L"),
    "mnist": Preset(28, 28, (0.1307,), (0.3081,), crop="random_crop", padding=2, hflip=False, mode="L"),
    "cifar10": Preset(32, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), crop="random_crop", padding=4),
    "cifar100": Preset(32, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), crop="random_crop", padding=4),
    # MixNN paper: Clothing1M images resized to 256x256, random 224 crop + flip; WebVision random 227 crop + flip
    "clothing1m": Preset(224, 256, (0.6959, 0.6537, 0.6371), (0.3113, 0.3192, 0.3214), crop="resize_random_crop",
                         square=True),
    "webvision": Preset(227, 256, *IMAGENET, crop="resize_random_crop"),
    "imagenet": Preset(224, 256, *IMAGENET),
}


def get_preset(dataset: str, size: int | None = None) -> Preset:
    """The preset of a data set name (prefix match: `webvision-mini` -> `webvision`), crop size overridable."""
    key = next((k for k in PRESETS if dataset.startswith(k)), "imagenet")
    preset = PRESETS[key]
    if size and size != preset.size:
        preset = Preset(**{**preset.__dict__, "size": size, "resize": max(size, round(size * preset.resize / preset.size))})
    return preset


def resize_size(preset: Preset) -> list[int]:
    """torchvision's `size` argument: [s] (shorter side to s) or [s, s] (square, aspect not kept)."""
    return [preset.resize, preset.resize] if preset.square else [preset.resize]


def as_uint8_tensor(image) -> torch.Tensor:
    """A PIL image as a uint8 CHW tensor; a tensor (e.g. from the decoded-image cache) as it is."""
    return image if isinstance(image, torch.Tensor) else F.pil_to_tensor(image)


def mean_std(preset: Preset) -> tuple[torch.Tensor, torch.Tensor]:
    """The preset's normalisation as [C, 1, 1] float32 tensors."""
    return (torch.as_tensor(preset.mean, dtype=torch.float32).view(-1, 1, 1),
            torch.as_tensor(preset.std, dtype=torch.float32).view(-1, 1, 1))


def normalise(image: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 -> float in [0, 1] -> (x - mean) / std: the same arithmetic as v2's ToDtype + Normalize (one image
    or a batch: the [C, 1, 1] mean and std broadcast)."""
    return image.to(torch.float32).mul_(1.0 / 255).sub_(mean).div_(std)


class Normalising:
    """The normalisation step shared by the train and eval transforms. With `normalise=False` the transform
    returns the uint8 crop and `to_device` normalises the collated batch on the device instead: a quarter
    of float32's bytes through the DataLoader workers' shared memory and the host-to-device copy, the same
    float32 values (elementwise the same operations)."""

    def __init__(self, preset: Preset, normalise: bool):
        self.mean, self.std = mean_std(preset)
        self.normalise = normalise

    def finish(self, image: torch.Tensor) -> torch.Tensor:
        """One transformed uint8 image: normalised here, or kept uint8 for `to_device`."""
        return normalise(image, self.mean, self.std) if self.normalise else image

    def to_device(self, images: torch.Tensor, device) -> torch.Tensor:
        """A collated batch as the model's input on `device` (a uint8 batch is normalised there)."""
        images = images.to(device, non_blocking=True)
        if images.dtype != torch.uint8:
            return images
        return normalise(images, self.mean.to(device), self.std.to(device))


def caches_resized(preset: Preset) -> bool:
    """Whether the train and the eval transform both start by resizing to the preset's `resize` (so an image
    stored after that step serves both exactly): `resize_random_crop` presets (Clothing1M, WebVision)."""
    return preset.crop == "resize_random_crop"


def draft_for(preset: Preset) -> tuple[int, int] | None:
    """The size a JPEG may be decoded down to (PIL's `draft`) before the transforms, for `caches_resized`
    presets: both sides at least `resize`, which the first step then resizes to. Measured on the real-size
    JPEGs of bench/data_path.py, the resized image differs from the full decode's by 0.8 of 255 grey levels
    on average (the 95th percentile of the per-image mean: 2.7); a shorter-side preset's longer side can
    come out one pixel shorter or longer. None: decode in full."""
    return (preset.resize, preset.resize) if caches_resized(preset) else None


class ResizeStep:
    """The transforms' first step for `caches_resized` presets: uint8 CHW tensor resized to `resize`
    (unchanged when already at it, as both transforms then leave it)."""

    def __init__(self, *, preset: Preset):
        self.size = resize_size(preset)

    def __call__(self, image) -> torch.Tensor:
        image = as_uint8_tensor(image)
        return F.resize(image, self.size, antialias=True)


class TrainTransform(Normalising):
    """Random crop (resized, or padded for small images) + optional flip + normalise (here, or with
    `normalise=False` on the device: `Normalising`).

    Accepts PIL images or uint8 CHW tensors, and computes exactly what torchvision's v2 Compose of
    PILToTensor, the crop, RandomHorizontalFlip, ToDtype and Normalize computes, random draws included
    (tested equal), without the Compose's per-sample dispatch. The padded/plain random crop (digits,
    CIFAR; Clothing1M after its resize) is plain tensor indexing: ~15 us per sample instead of ~60-90,
    which is most of a tiny model's epoch. The random resized crop (WebVision, ImageNet-style) uses v2's
    own parameter draw and kernel: ~130 us per 64x64 sample instead of ~280.
    """

    def __init__(self, *, preset: Preset, normalise: bool = True):
        super().__init__(preset, normalise)
        self.preset = preset
        self.random_resized_crop = T.RandomResizedCrop(preset.size, antialias=True)

    def __call__(self, image):
        image = as_uint8_tensor(image)
        if self.preset.crop in ("random_crop", "resize_random_crop"):
            if self.preset.crop == "resize_random_crop":
                image = F.resize(image, resize_size(self.preset), antialias=True)
            image = self.pad_and_crop(image)
        else:
            params = self.random_resized_crop.make_params([image])
            image = F.resized_crop(image, **params, size=[self.preset.size, self.preset.size], antialias=True)
        if self.preset.hflip and not torch.rand(1) >= 0.5:  # v2: no flip when rand >= p
            image = image.flip(-1)
        return self.finish(image)

    def pad_and_crop(self, image: torch.Tensor) -> torch.Tensor:
        """v2's RandomCrop(size, padding): zero padding, then top and left drawn in that order."""
        size, pad = self.preset.size, self.preset.padding
        height, width = image.shape[-2] + 2 * pad, image.shape[-1] + 2 * pad
        if height < size or width < size:
            raise ValueError(f"crop size {size} is larger than the padded image {(height, width)}")
        top = int(torch.randint(0, height - size + 1, size=())) if height > size else 0
        left = int(torch.randint(0, width - size + 1, size=())) if width > size else 0
        if pad:
            image = torch.nn.functional.pad(image, (pad, pad, pad, pad))
        return image[..., top:top + size, left:left + size]


class EvalTransform(Normalising):
    """Resize the shorter side + centre crop + normalise (no randomness; normalising as `TrainTransform`);
    PIL images or uint8 tensors.

    The torchvision kernels are called directly (the same ops as a v2 Compose, without its per-sample
    dispatch overhead); an image already at the eval size is only normalised.
    """

    def __init__(self, *, preset: Preset, normalise: bool = True):
        super().__init__(preset, normalise)
        self.preset = preset

    def __call__(self, image):
        image = as_uint8_tensor(image)
        shape, size = tuple(image.shape[-2:]), resize_size(self.preset)
        if (shape if self.preset.square else (min(shape),)) != tuple(size):  # already at the eval size: skip
            image = F.resize(image, size, antialias=True)
        if tuple(image.shape[-2:]) != (self.preset.size, self.preset.size):
            image = F.center_crop(image, [self.preset.size])
        return self.finish(image)
