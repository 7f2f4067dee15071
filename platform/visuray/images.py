"""Image decoding and preprocessing shared by ingest, training, indexing and serving.

Decoding is defensive because the same code takes user uploads in the router: a decompression bomb or a
truncated file is an :class:`ImageDecodeError` with a message a client can act on, never a crash.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from PIL import Image, UnidentifiedImageError

if TYPE_CHECKING:
    import torch

# 40 megapixels: a 20,000 x 20,000 bomb (400 MP) is refused before it is decoded, a 6,000 x 6,000 camera
# photo is accepted.
DEFAULT_MAX_PIXELS = 40_000_000

# ImageNet statistics: what most pretrained weights expect (torchvision, DINO), what random-init models use,
# and what a model artifact written before its weights' own statistics were recorded was trained with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class InputSpec:
    """How pixels become one model's input: the square side, and the per-channel mean and std that
    [0, 1] pixels are normalised with. Pretrained weights bring their own (timm's ``pretrained_cfg``:
    EfficientNet-Lite 0.5 / 0.5, CLIP its own); a model records them and every stage reads them from it."""

    img_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def normalise(self, batch: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) pixels (uint8, or float in [0, 1]) -> the model's float input."""
        import torch

        x = batch.float().div(255.0) if batch.dtype == torch.uint8 else batch.float()
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std


def as_input_spec(spec: InputSpec | int) -> InputSpec:
    """``spec`` itself, or for a bare size the ImageNet statistics at that size."""
    return spec if isinstance(spec, InputSpec) else InputSpec(int(spec))


class ImageDecodeError(ValueError):
    """Bytes that are not a usable image (not an image, truncated, too many pixels)."""


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode bytes into an RGB PIL image, checking the size before decoding the pixels."""
    if not data:
        raise ImageDecodeError("empty image data")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > max_pixels:
                raise ImageDecodeError(
                    f"image is {width}x{height} pixels, above the limit of {max_pixels} pixels"
                )
            img.load()  # a truncated file fails here, not later in a worker
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        raise ImageDecodeError("not a decodable image (unrecognised format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(f"image refused as a decompression bomb: {exc}") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageDecodeError(f"corrupt or truncated image: {exc}") from None
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img


def encode_jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def resize_max_side(img: Image.Image, max_side: int) -> Image.Image:
    """Downscale so the longer side is at most ``max_side`` (never upscales)."""
    width, height = img.size
    scale = max_side / max(width, height)
    if scale >= 1:
        return img
    return img.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.BICUBIC)


def center_crop_uint8(images: Sequence[Image.Image], img_size: int) -> torch.Tensor:
    """(N, 3, S, S) uint8: each image's shorter side resized to ``img_size``, then a centre crop."""
    import torch
    from torchvision.transforms import functional as F

    out = torch.empty((len(images), 3, img_size, img_size), dtype=torch.uint8)
    for i, img in enumerate(images):
        t = F.resize(F.pil_to_tensor(img.convert("RGB")), img_size, antialias=True)
        out[i] = F.center_crop(t, [img_size, img_size])
    return out


def to_model_input(images: Sequence[Image.Image], spec: InputSpec | int) -> torch.Tensor:
    """Resize (shorter side), centre-crop and normalise a list of images into an (N, 3, S, S) tensor.

    The one preprocessing used at evaluation, index and serving time, so that a catalog embedded by the
    index job and a query embedded by Serve go through exactly the same pixels-to-tensor path. ``spec``
    is the model's :class:`InputSpec` (a bare size means ImageNet statistics).
    """
    spec = as_input_spec(spec)
    return spec.normalise(center_crop_uint8(images, spec.img_size))


def encoded_image_batches(
    images: Sequence[bytes], spec: InputSpec | int, batch_size: int = 128
) -> Iterator[torch.Tensor]:
    """Encoded images as :func:`to_model_input` batches of at most ``batch_size``, decoded batch by batch."""
    for start in range(0, len(images), batch_size):
        yield to_model_input([decode_image(b) for b in images[start : start + batch_size]], spec)
