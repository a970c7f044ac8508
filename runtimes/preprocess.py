"""Image preprocessing on the device: the exported `vision_encoder`'s input, with numpy and Pillow only.

A bundle's vision part takes the resized RGB image as uint8 `(3, S, S)` (batched to `(1, 3, S, S)`, the layout
ExecuTorch's MultimodalRunner passes) and normalises inside. This module makes that array byte for byte as the
host makes the image it hands the HF processor (`data.collate.Collator`): `vlsi_edge.data.images.load_image`
(frame 0, EXIF orientation, any mode to 8-bit RGB with transparency on white), then
`models.common.square_image` (Pillow bicubic to S×S, untouched when already S×S).

    from vlsi_edge.runtimes.preprocess import load_image
    pixels = load_image("cat.jpg", 112)[None]     # (1, 3, 112, 112) uint8
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from vlsi_edge.data import images


def load_image(src: str | Path | Image.Image, size: int) -> np.ndarray:
    """`src` (a path, or an opened PIL image, used at its current frame) as contiguous uint8 `(3, size, size)`."""
    if isinstance(src, Image.Image):
        rgb = images.to_rgb(ImageOps.exif_transpose(src))  # what images.load_image does after decoding a file
    else:
        rgb = images.load_image(Path(src))
    return to_chw(resize(rgb, size))


def resize(image: Image.Image, size: int) -> Image.Image:
    """The host's `square_image`: bicubic to size×size, unless it already is."""
    if image.size == (size, size):
        return image
    return image.resize((size, size), Image.Resampling.BICUBIC)


def to_chw(image: Image.Image) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1))
