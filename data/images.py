"""Decoded images in the mode a data set trains in (L or RGB), whatever mode the file holds.

Pillow's `convert` alone gets some modes wrong for training: 16-bit and 32-bit integer greyscale
(`I;16*`, `I`) clip to white in L/RGB, float images (`F`) clip too, and transparent images (`RGBA`, `LA`,
`P` with transparency) keep whatever colour the invisible pixels happen to hold. Here high bit depths are
scaled to 8 bits and transparency is composited over white.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

BACKGROUND = 255  # transparent pixels show white


def to_8bit(img: Image.Image) -> Image.Image:
    """An `I;16*`, `I` or `F` image as 8-bit greyscale: 16-bit ranges scaled by 255/65535, float ranges
    (values in [0, 1], else [0, 255]) scaled to 0..255."""
    array = np.asarray(img)
    if img.mode == "F":
        scale = 255.0 if float(np.nanmax(array, initial=0.0)) <= 1.0 else 1.0
        out = np.clip(np.nan_to_num(array) * scale, 0, 255)
    else:  # 16-bit (I;16, I;16B, ...) and 32-bit integer files hold 16-bit data in practice
        out = np.clip(array.astype(np.float64) * (255.0 / 65535.0), 0, 255)
    return Image.fromarray(np.round(out).astype(np.uint8), mode="L")


def convert_image(img: Image.Image, mode: str) -> Image.Image:
    """`img` in `mode` ("L" or "RGB"), high bit depths scaled and transparency composited over white."""
    if img.mode.startswith("I") or img.mode == "F":
        img = to_8bit(img)
    elif img.mode == "P" and "transparency" in img.info or img.mode in ("PA", "RGBa", "La"):
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA"):
        background = Image.new("RGBA", img.size, (BACKGROUND,) * 3 + (255,))
        img = Image.alpha_composite(background, img.convert("RGBA"))
    return img.convert(mode)  # also for the same mode: a loaded copy that outlives the file
