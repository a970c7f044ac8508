"""Safe image loading for datasets and the device-side benchmark (numpy + Pillow only).

Every image a sample names goes through here: `resolve_image_path` keeps paths inside the dataset's image root,
`load_image` turns whatever Pillow can open into a fully decoded 8-bit RGB image, and `check_image` is the cheap
per-image check that `Dataset.validate` runs. Anything unusable raises `DataError` naming the file.

Normalisation rules (so the teacher, the PyTorch student and an exported student all see the same pixels):
- frame 0 of animated GIF/PNG/WebP; EXIF orientation applied;
- transparency (RGBA, LA, PA, palette or greyscale with tRNS) composited on white;
- CMYK and other colour spaces converted by Pillow; 16-bit greyscale scaled to 8 bits (65535 -> 255);
- more than `MAX_IMAGE_PIXELS` pixels is refused from the header alone, before any decoding.
"""
from __future__ import annotations

import os
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vlsi_edge.errors import DataError

MAX_IMAGE_PIXELS = 40_000_000

_TRANSPARENT_MODES = {"RGBA", "LA", "PA", "La", "RGBa", "RGBX"}
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, struct.error, zlib.error)


def resolve_image_path(relative: str, root: Path) -> Path:
    """Join `relative` onto `root` and resolve it, refusing absolute paths and anything that leaves `root`.

    Symlinks are resolved before the check, so a link inside the root that points outside it is refused too.
    """
    if not isinstance(relative, str) or not relative.strip():
        raise DataError(f"image path {relative!r} is empty or not a string", "expected a path relative to the image root")
    if os.path.isabs(relative) or relative.startswith("~") or (len(relative) > 1 and relative[1] == ":"):
        raise DataError(
            f"image path {relative!r} is absolute",
            f"expected a path relative to the image root {root}",
        )
    root_resolved = Path(root).resolve()
    candidate = (root_resolved / relative).resolve()
    if candidate != root_resolved and root_resolved not in candidate.parents:
        raise DataError(
            f"image path {relative!r} escapes the image root {root_resolved} (resolves to {candidate})",
            "expected a path inside the image root; copy or link the images below it",
        )
    return candidate


def _check_file(path: Path) -> None:
    if not path.exists():
        raise DataError(f"image not found: {path}", "expected an existing image file")
    if not path.is_file():
        raise DataError(f"image path is not a file: {path}", "expected an image file")
    if path.stat().st_size == 0:
        raise DataError(f"image file is empty (0 bytes): {path}", "expected a PNG/JPEG/... image")


def _check_size(im: Image.Image, path: Path) -> None:
    width, height = im.size
    if width <= 0 or height <= 0:
        raise DataError(f"image {path} has an invalid size {width}x{height}", "expected positive width and height")
    if width * height > MAX_IMAGE_PIXELS:
        raise DataError(
            f"image {path} is {width}x{height} = {width * height:,} pixels, over the limit of {MAX_IMAGE_PIXELS:,}",
            "expected a smaller image (refused before decoding as a possible decompression bomb)",
        )


class _Opened:
    """`Image.open` with Pillow's decompression-bomb warning raised as an error, and every failure a DataError."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.image: Image.Image | None = None
        self._warnings = warnings.catch_warnings()

    def __enter__(self) -> Image.Image:
        _check_file(self.path)
        self._warnings.__enter__()
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            self.image = Image.open(self.path)
        except BaseException as exc:
            self._warnings.__exit__(None, None, None)
            raise _as_data_error(exc, self.path, "open") from exc
        try:
            _check_size(self.image, self.path)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self.image

    def __exit__(self, *exc_info) -> None:
        if self.image is not None:
            self.image.close()
        self._warnings.__exit__(None, None, None)


def _as_data_error(exc: BaseException, path: Path, stage: str) -> BaseException:
    if isinstance(exc, DataError):
        return exc
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return DataError(
            f"image {path} is too large to decode safely ({exc})",
            f"expected at most {MAX_IMAGE_PIXELS:,} pixels",
        )
    if isinstance(exc, UnidentifiedImageError):
        return DataError(f"not an image (Pillow cannot identify it): {path}", "expected a PNG/JPEG/GIF/WebP/... file")
    if isinstance(exc, _DECODE_ERRORS):
        what = "cannot open" if stage == "open" else "cannot decode (truncated or corrupt?)"
        return DataError(f"image {what}: {path} ({type(exc).__name__}: {exc})", "expected a complete, valid image file")
    return exc


def _sixteen_bit_to_rgb(im: Image.Image) -> Image.Image:
    arr = np.asarray(im)
    if im.mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        top = 1.0 if arr.size and float(np.nanmax(arr)) <= 1.0 else 255.0
        grey = np.clip(np.nan_to_num(arr) * (255.0 / top), 0, 255)
    else:
        arr = arr.astype(np.float64)
        grey = np.clip(arr, 0, 65535) / 257.0
    grey8 = np.rint(grey).astype(np.uint8)
    return Image.fromarray(np.stack([grey8] * 3, axis=-1), "RGB")


def _on_white(im: Image.Image) -> Image.Image:
    rgba = im.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert a loaded image of any mode to 8-bit RGB (transparency on white, 16-bit scaled down)."""
    mode = im.mode
    if mode.startswith("I") or mode == "F":
        return _sixteen_bit_to_rgb(im)
    if mode in _TRANSPARENT_MODES and mode != "RGBX":
        return _on_white(im)
    if "transparency" in im.info and mode in {"P", "L", "RGB", "1"}:
        return _on_white(im)
    if mode == "RGB":
        return im.copy()
    return im.convert("RGB")


def load_image(path: Path) -> Image.Image:
    """Open `path` and return a fully loaded, independent 8-bit RGB image (see the module docstring for rules)."""
    path = Path(path)
    with _Opened(path) as im:
        try:
            if getattr(im, "n_frames", 1) > 1:
                im.seek(0)
            im.load()
            oriented = ImageOps.exif_transpose(im)
            rgb = to_rgb(oriented)
            rgb.load()
        except BaseException as exc:
            raise _as_data_error(exc, path, "decode") from exc
    return rgb


def check_image(path: Path, decode: bool = True) -> None:
    """Validate one image: it exists, is non-empty, Pillow identifies it, its size is within the limit and
    `verify()` passes; with `decode` (default) it is also fully decoded, which catches truncated JPEGs and the
    like that `verify()` lets through. Raises DataError naming the file."""
    path = Path(path)
    with _Opened(path) as im:
        try:
            im.verify()
        except BaseException as exc:
            raise _as_data_error(exc, path, "decode") from exc
    if decode:
        with _Opened(path) as im:
            try:
                im.load()
            except BaseException as exc:
                raise _as_data_error(exc, path, "decode") from exc
