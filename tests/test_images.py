"""Image decoding (bad input is an ImageDecodeError, never a crash) and the model-input preprocessing."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from visuray.images import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageDecodeError,
    InputSpec,
    decode_image,
    encode_jpeg,
    resize_max_side,
    to_model_input,
)

pytestmark = pytest.mark.unit


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR claiming width x height, with no pixel data: 57 bytes."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IEND", b"")


def noise_image(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = 3 if mode == "RGB" else 1
    pixels = rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)
    return Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode)


def image_bytes(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("width", "height"),
    [(20_000, 20_000), (7_000, 7_000)],  # above Pillow's own bomb limit; above only ours (40 MP)
)
def test_decompression_bomb_is_refused_before_decoding(width: int, height: int) -> None:
    data = png_header_only(width, height)
    assert len(data) < 100  # the bomb is only a header: refusing it must not allocate its pixels
    with pytest.raises(ImageDecodeError) as err:
        decode_image(data)
    assert "pixels" in str(err.value) or "decompression" in str(err.value).lower()


def test_max_pixels_limit_is_configurable() -> None:
    data = image_bytes(noise_image(50, 40), "PNG")
    assert decode_image(data, max_pixels=2000).size == (50, 40)
    with pytest.raises(ImageDecodeError, match="50x40 pixels, above the limit of 1999"):
        decode_image(data, max_pixels=1999)


def test_truncated_jpeg_is_an_error() -> None:
    data = encode_jpeg(noise_image(64, 64))
    assert decode_image(data).size == (64, 64)
    with pytest.raises(ImageDecodeError, match="truncated|corrupt"):
        decode_image(data[: len(data) // 2])


@pytest.mark.parametrize(
    "data",
    [b"", b"this is not an image at all", bytes(np.random.default_rng(1).integers(0, 256, 4096, np.uint8))],
    ids=["empty", "text", "random"],
)
def test_non_image_bytes_are_an_error(data: bytes) -> None:
    with pytest.raises(ImageDecodeError):
        decode_image(data)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_grayscale_decodes_to_rgb_with_equal_channels(fmt: str) -> None:
    gray = noise_image(16, 12, mode="L")
    img = decode_image(image_bytes(gray, fmt))
    assert img.mode == "RGB" and img.size == (16, 12)
    rgb = np.asarray(img)
    assert np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2])
    if fmt == "PNG":  # lossless: the gray values themselves survive
        assert np.array_equal(rgb[..., 0], np.asarray(gray))


def test_palette_and_alpha_images_decode_to_rgb() -> None:
    rgba = Image.new("RGBA", (8, 8), (10, 20, 30, 128))
    assert decode_image(image_bytes(rgba, "PNG")).mode == "RGB"
    palette = noise_image(8, 8).convert("P")
    assert decode_image(image_bytes(palette, "PNG")).mode == "RGB"


def test_resize_max_side_downscales_only() -> None:
    assert resize_max_side(noise_image(200, 100), 64).size == (64, 32)
    assert resize_max_side(noise_image(30, 90), 45).size == (15, 45)
    small = noise_image(40, 20)
    assert resize_max_side(small, 64) is small


def _manual_model_input(img: Image.Image, crop_box: tuple[int, int, int, int], spec: InputSpec) -> np.ndarray:
    """Slow reference: crop in PIL, scale to [0, 1], normalise channel by channel, HWC -> CHW."""
    pixels = np.asarray(img.convert("RGB").crop(crop_box), dtype=np.float64) / 255.0
    out = np.empty((3, pixels.shape[0], pixels.shape[1]))
    for c in range(3):
        out[c] = (pixels[..., c] - spec.mean[c]) / spec.std[c]
    return out


@pytest.mark.parametrize(
    "spec",
    [
        InputSpec(24),
        InputSpec(24, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
        InputSpec(24, (0.1, 0.2, 0.3), (0.9, 0.8, 0.7)),
    ],
    ids=["imagenet", "efficientnet-lite", "other"],
)
def test_to_model_input_matches_manual_normalisation_and_centre_crop(spec: InputSpec) -> None:
    square = noise_image(24, 24, seed=2)
    wide = noise_image(40, 24, seed=3)  # shorter side already 24: no resampling, only the centre crop
    tall = noise_image(24, 31, seed=4)  # odd margin: 7 rows to drop; torchvision rounds the top offset up (4)
    batch = to_model_input([square, wide, tall], spec)
    assert batch.shape == (3, 3, 24, 24) and batch.dtype == torch.float32
    expected = [
        _manual_model_input(square, (0, 0, 24, 24), spec),
        _manual_model_input(wide, (8, 0, 32, 24), spec),
        _manual_model_input(tall, (0, 4, 24, 28), spec),
    ]
    for got, want in zip(batch.numpy(), expected, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_to_model_input_resizes_the_shorter_side() -> None:
    # A flat colour stays flat through any resampling, so the expected value is exact.
    flat = Image.new("RGB", (120, 60), (255, 128, 0))
    batch = to_model_input([flat, decode_image(encode_jpeg(noise_image(50, 90)))], 32)  # a size: ImageNet's
    assert batch.shape == (2, 3, 32, 32)
    for c, value in enumerate((255, 128, 0)):
        expected = (value / 255.0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
        torch.testing.assert_close(batch[0, c], torch.full((32, 32), expected), atol=1e-5, rtol=0)
