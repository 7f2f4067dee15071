"""Wild backgrounds for studio photos: cut the product out of its white background, paste it on clutter.

Catalog photos are shot on white. The product mask is every pixel *except* the near-white pixels that are
connected to the image border (flood fill from the border through pixels whose darkest channel is at
least ``white_level``): white regions inside the product (a white shirt's front, a logo) stay product
because they are enclosed by it. The mask's edge is feathered by a small blur so no white halo remains.

Backgrounds are crops of real street photos (clothing-small: people, rooms, shops, other garments, i.e.
genuine clutter) or, without photos, generated clutter (noise plus random rectangles and ellipses). Each
item gets a fixed background and crop from its seed, so the "wild" test set is the same in every run.

:class:`BackgroundCompositing` is the same cut-out used as a training augmentation: the products' alpha
masks are computed once at model resolution (:func:`foreground_alphas`) and a pool of background crops
is cut once (:func:`background_crops`), so a step only blends tensors. Its photos must not be the ones
the wild test set uses (e.g. clothing-small ``train`` for training, ``test`` for the wild evaluation).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw

if TYPE_CHECKING:
    import torch

# The darkest channel of studio white is ~248-255 after JPEG; white products sit at ~235-248, so 246 keeps
# their faint outline as product while JPEG noise on the backdrop stays background.
DEFAULT_WHITE_LEVEL = 246


def foreground_mask(
    img: Image.Image, white_level: int = DEFAULT_WHITE_LEVEL, close_iterations: int = 3
) -> np.ndarray:
    """(H, W) bool: True on the product, False on the near-white background connected to the border."""
    from scipy import ndimage

    pixels = np.asarray(img.convert("RGB"))
    # Close small gaps in the product's outline first: a white product's faint edge has JPEG gaps through
    # which the fill would otherwise leak into the product.
    outline = ndimage.binary_closing(pixels.min(axis=2) < white_level, iterations=close_iterations)
    components, _ = ndimage.label(~outline)
    border = np.unique(np.concatenate([components[0], components[-1], components[:, 0], components[:, -1]]))
    background = np.isin(components, border[border > 0])
    return ~background


def generated_clutter(size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """A synthetic cluttered scene: coloured noise under random rectangles and ellipses."""
    width, height = size
    base = rng.integers(0, 256, (max(height // 8, 1), max(width // 8, 1), 3), dtype=np.uint8)
    img = Image.fromarray(base).resize((width, height), Image.BILINEAR)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(6, 14))):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        x1 = x0 + int(rng.integers(width // 8, width // 2 + 1))
        y1 = y0 + int(rng.integers(height // 8, height // 2 + 1))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        shape = draw.rectangle if rng.random() < 0.5 else draw.ellipse
        shape([x0, y0, x1, y1], fill=colour)
    return img


def random_crop(background: Image.Image, size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """A random square-ish crop (50-100% of the short side) of ``background``, resized to ``size``."""
    width, height = background.size
    side = max(1, int(min(width, height) * rng.uniform(0.5, 1.0)))
    left, top = int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1))
    return background.crop((left, top, left + side, top + side)).resize(size, Image.BILINEAR)


def feathered_alpha(mask: np.ndarray, feather: float = 0.8) -> np.ndarray:
    """(H, W) float32 in [0, 1]: ``mask`` with its inner edge blurred by ``feather`` (0: the hard mask)."""
    from scipy import ndimage

    alpha = mask.astype(np.float32)
    if feather > 0:
        # Soften the product's inner edge only: its anti-aliased white fringe blends into the background,
        # while no background pixel takes product colour and the product's interior stays opaque.
        alpha = ndimage.gaussian_filter(alpha, feather) * alpha
    return alpha


def composite(
    product: Image.Image, background: Image.Image, mask: np.ndarray, feather: float = 0.8
) -> Image.Image:
    """``product`` pasted over ``background`` (same size) through ``mask``, its edge blurred by ``feather``."""
    alpha = feathered_alpha(mask, feather)
    front = np.asarray(product.convert("RGB"), dtype=np.float32)
    back = np.asarray(background.convert("RGB").resize(product.size), dtype=np.float32)
    out = alpha[..., None] * front + (1 - alpha[..., None]) * back
    return Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8))


def item_rng(item_id: str, seed: int) -> np.random.Generator:
    """A generator fixed by (item, seed): the same item always gets the same background."""
    digest = hashlib.sha256(f"{seed}:{item_id}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


class BackgroundBank:
    """Where backgrounds come from: a list of photo files, or generated clutter when the list is empty."""

    def __init__(self, paths: Sequence[str | Path] = ()) -> None:
        self.paths = [Path(p) for p in paths]

    @classmethod
    def from_folder(cls, folder: str | Path, limit: int | None = 500) -> BackgroundBank:
        """Photos under ``folder`` (recursively, sorted, the first ``limit``): e.g. clothing-small's test split."""
        paths = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        if not paths:
            raise FileNotFoundError(f"no background photos under {folder}")
        return cls(paths[:limit] if limit else paths)

    @property
    def kind(self) -> str:
        return "photos" if self.paths else "generated clutter"

    def background(self, size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
        if not self.paths:
            return generated_clutter(size, rng)
        from visuray.images import decode_image

        path = self.paths[int(rng.integers(0, len(self.paths)))]
        return random_crop(decode_image(path.read_bytes()), size, rng)

    def wild(self, product: Image.Image, item_id: str, seed: int = 0) -> Image.Image:
        """``product`` (a white-background photo) on this bank's background chosen by (item, seed)."""
        rng = item_rng(item_id, seed)
        return composite(product, self.background(product.size, rng), foreground_mask(product))


# ---------------- training-time compositing ----------------


def foreground_alphas(images: Sequence[bytes], img_size: int, feather: float = 0.8) -> torch.Tensor:
    """(N, 1, S, S) uint8 alpha of encoded studio photos (255 = product), feathered as :func:`composite`
    does and resized and centre-cropped exactly as :func:`visuray.images.center_crop_uint8` crops the
    photos themselves, so mask and pixels line up."""
    from visuray.images import center_crop_uint8, decode_image

    masks = []
    for data in images:
        alpha = feathered_alpha(foreground_mask(decode_image(data)), feather)
        masks.append(Image.fromarray(np.clip(alpha * 255 + 0.5, 0, 255).astype(np.uint8)))
    return center_crop_uint8(masks, img_size)[:, :1]


def background_crops(bank: BackgroundBank, count: int, img_size: int, seed: int = 0) -> torch.Tensor:
    """(count, 3, S, S) uint8 random crops of the bank's backgrounds (its photos, or generated clutter)."""
    from visuray.images import center_crop_uint8

    rng = np.random.default_rng(seed)
    return center_crop_uint8([bank.background((img_size, img_size), rng) for _ in range(count)], img_size)


class BackgroundCompositing:
    """Training augmentation: each image of a batch, with probability ``probability``, pasted over a
    background crop drawn from ``backgrounds`` through its alpha mask. Which images and which crops are a
    function of (seed, step), like the batches, so every model of a comparison and a resumed run see the
    same composites."""

    def __init__(
        self, alphas: torch.Tensor, backgrounds: torch.Tensor, probability: float, seed: int = 0
    ) -> None:
        if not 0.0 <= probability <= 1.0:
            raise ValueError(f"compositing probability must be in [0, 1], got {probability}")
        if alphas.shape[-2:] != backgrounds.shape[-2:] or len(backgrounds) == 0:
            raise ValueError(
                f"alphas {tuple(alphas.shape)} and backgrounds {tuple(backgrounds.shape)} need the same size"
            )
        self.alphas, self.backgrounds = alphas, backgrounds
        self.probability, self.seed = probability, seed

    def __call__(self, batch: torch.Tensor, rows: Sequence[int], step: int) -> torch.Tensor:
        """The uint8 ``batch`` of training items ``rows`` at ``step``, some of it composited."""
        import torch

        # + 1: at step 0 this stream must not be the one the loop's flips and shifts draw from (seeded
        # with the bare seed), or a composite would decide its own image's flip.
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step + 1)
        n = len(batch)
        chosen = torch.rand(n, generator=generator) < self.probability
        crops = self.backgrounds[torch.randint(0, len(self.backgrounds), (n,), generator=generator)]
        alpha = self.alphas[list(rows)].float().div(255.0)
        blended = (alpha * batch.float() + (1 - alpha) * crops.float()).round().clamp(0, 255).to(torch.uint8)
        return torch.where(chosen[:, None, None, None], blended, batch)
