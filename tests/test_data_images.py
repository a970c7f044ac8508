"""Image loading edge cases: every bad file is a one-line DataError naming it; odd modes become 8-bit RGB."""
from __future__ import annotations

import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from vlsi_edge.data.images import MAX_IMAGE_PIXELS, check_image, load_image, resolve_image_path
from vlsi_edge.errors import DataError


def _png_header_only(path, width, height):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def _noise_png(path, size=(64, 64)):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def test_resolve_inside_root(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.png").write_bytes(b"")
    assert resolve_image_path("a/x.png", tmp_path) == (tmp_path / "a" / "x.png").resolve()
    assert resolve_image_path("a/../a/x.png", tmp_path) == (tmp_path / "a" / "x.png").resolve()


@pytest.mark.parametrize("relative, words", [("../outside.png", "escapes"), ("/etc/passwd", "absolute"),
                                             ("a/../../x.png", "escapes"), ("", "empty")])
def test_resolve_refuses(tmp_path, relative, words):
    with pytest.raises(DataError, match=words):
        resolve_image_path(relative, tmp_path / "root")


def test_resolve_refuses_symlink_escape(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir(), outside.mkdir()
    _noise_png(outside / "secret.png")
    (root / "link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(DataError, match="escapes"):
        resolve_image_path("link/secret.png", root)


def test_missing_zero_byte_not_an_image(tmp_path):
    with pytest.raises(DataError, match=r"not found: .*nope\.png"):
        load_image(tmp_path / "nope.png")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"empty \(0 bytes\): .*empty\.png"):
        load_image(tmp_path / "empty.png")
    (tmp_path / "text.png").write_text("hello, I am not a picture")
    with pytest.raises(DataError, match=r"not an image .*text\.png"):
        load_image(tmp_path / "text.png")
    with pytest.raises(DataError, match=r"text\.png"):
        check_image(tmp_path / "text.png")


def test_truncated_png(tmp_path):
    data = _noise_png(tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    for fn in (load_image, check_image):
        with pytest.raises(DataError, match=r"cut\.png") as info:
            fn(tmp_path / "cut.png")
        assert "\n" not in str(info.value)


def test_one_pixel(tmp_path):
    Image.new("L", (1, 1), 7).save(tmp_path / "one.png")
    im = load_image(tmp_path / "one.png")
    assert im.mode == "RGB" and im.size == (1, 1) and im.getpixel((0, 0)) == (7, 7, 7)
    check_image(tmp_path / "one.png")


@pytest.mark.parametrize("side", [8000, 10000, 20000, 70000])  # ours, Pillow warning, Pillow error x2
def test_decompression_bomb_refused_from_header(tmp_path, side):
    path = _png_header_only(tmp_path / f"bomb{side}.png", side, side)
    before_limit, before_filters = Image.MAX_IMAGE_PIXELS, list(warnings.filters)
    for fn in (load_image, check_image):
        with pytest.raises(DataError, match=rf"bomb{side}\.png.*(pixels|too large)"):
            fn(path)
    assert Image.MAX_IMAGE_PIXELS == before_limit
    assert warnings.filters == before_filters
    assert side * side > MAX_IMAGE_PIXELS


def test_cmyk_jpeg(tmp_path):
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=95)
    im = load_image(tmp_path / "cmyk.jpg")
    r, g, b = im.getpixel((8, 8))
    assert im.mode == "RGB" and r > 200 and g < 60 and b < 60


def test_sixteen_bit_grey(tmp_path):
    arr = np.array([[0, 65535, 32896, 257]], dtype=np.uint16)
    Image.fromarray(arr).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as raw:
        assert raw.mode.startswith("I")
    im = load_image(tmp_path / "g16.png")
    assert im.mode == "RGB"
    assert [im.getpixel((x, 0)) for x in range(4)] == [(0, 0, 0), (255, 255, 255), (128, 128, 128), (1, 1, 1)]


def test_transparency_composited_on_white(tmp_path):
    pal = Image.new("P", (2, 1))
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.putpixel((0, 0), 0), pal.putpixel((1, 0), 1)
    pal.save(tmp_path / "pal.png", transparency=1)
    im = load_image(tmp_path / "pal.png")
    assert im.getpixel((0, 0)) == (255, 0, 0) and im.getpixel((1, 0)) == (255, 255, 255)

    Image.new("RGBA", (2, 2), (255, 0, 0, 128)).save(tmp_path / "rgba.png")
    r, g, b = load_image(tmp_path / "rgba.png").getpixel((0, 0))
    assert r == 255 and 120 <= g <= 135 and 120 <= b <= 135

    Image.new("LA", (2, 2), (0, 0)).save(tmp_path / "la.png")
    assert load_image(tmp_path / "la.png").getpixel((1, 1)) == (255, 255, 255)


@pytest.mark.parametrize("fmt", ["GIF", "PNG"])
def test_animated_first_frame(tmp_path, fmt):
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    path = tmp_path / f"anim.{fmt.lower()}"
    frames[0].save(path, format=fmt, save_all=True, append_images=frames[1:], duration=50, loop=0)
    with Image.open(path) as raw:
        assert getattr(raw, "n_frames", 1) == 3
    im = load_image(path)
    assert im.mode == "RGB" and im.getpixel((4, 4)) == (255, 0, 0)


def test_exif_orientation_applied(tmp_path):
    im = Image.new("RGB", (20, 10), (255, 0, 0))
    exif = im.getexif()
    exif[0x0112] = 6
    im.save(tmp_path / "rot.png", exif=exif.tobytes())
    assert load_image(tmp_path / "rot.png").size == (10, 20)


def test_returned_image_is_independent(tmp_path):
    path = _noise_png(tmp_path / "n.png", (5, 4))
    im = load_image(path)
    path.unlink()
    assert im.size == (5, 4) and im.mode == "RGB" and len(im.tobytes()) == 60
