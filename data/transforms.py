"""Transforms as small keyword-only classes (after torchvision's references/classification/presets.py)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision.transforms import v2 as T


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


IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
PRESETS = {
    "digits": Preset(8, 8, (0.31,), (0.37,), crop="random_crop", padding=1, hflip=False, mode="L"),
    "cifar10": Preset(32, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), crop="random_crop", padding=4),
    "cifar100": Preset(32, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), crop="random_crop", padding=4),
    "clothing1m": Preset(224, 256, (0.6959, 0.6537, 0.6371), (0.3113, 0.3192, 0.3214), crop="resize_random_crop"),
    "webvision": Preset(227, 256, *IMAGENET),
    "imagenet": Preset(224, 256, *IMAGENET),
}


def get_preset(dataset: str, size: int | None = None) -> Preset:
    """The preset of a data set name (prefix match: `webvision-mini` -> `webvision`), crop size overridable."""
    key = next((k for k in PRESETS if dataset.startswith(k)), "imagenet")
    preset = PRESETS[key]
    if size and size != preset.size:
        preset = Preset(**{**preset.__dict__, "size": size, "resize": max(size, round(size * preset.resize / preset.size))})
    return preset


class TrainTransform:
    """Random crop (resized, or padded for small images) + optional flip + normalise."""

    def __init__(self, *, preset: Preset):
        if preset.crop == "random_crop":
            crop = [T.RandomCrop(preset.size, padding=preset.padding)]
        elif preset.crop == "resize_random_crop":
            crop = [T.Resize(preset.resize, antialias=True), T.RandomCrop(preset.size)]
        else:
            crop = [T.RandomResizedCrop(preset.size, antialias=True)]
        flips = [T.RandomHorizontalFlip()] if preset.hflip else []
        self.transforms = T.Compose([T.PILToTensor(), *crop, *flips, T.ToDtype(torch.float32, scale=True),
                                     T.Normalize(preset.mean, preset.std)])

    def __call__(self, image):
        return self.transforms(image)


class EvalTransform:
    """Resize the shorter side + centre crop + normalise (no randomness)."""

    def __init__(self, *, preset: Preset):
        self.transforms = T.Compose([T.PILToTensor(), T.Resize(preset.resize, antialias=True), T.CenterCrop(preset.size), T.ToDtype(torch.float32, scale=True),
                                     T.Normalize(preset.mean, preset.std)])

    def __call__(self, image):
        return self.transforms(image)
