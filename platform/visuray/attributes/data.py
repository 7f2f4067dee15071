"""Data for attribute models: held-out splits by product, images as uint8 tensors, batches.

Splits are a hash of (seed, item_id): a product lands in the same split in every run, on every worker,
and whatever the catalog's row order, so validation (thresholds) and test (metrics) hold products the
model never trained on.

Images are decoded once into a uint8 (N, 3, S, S) tensor with exactly the resize and centre crop of
:func:`visuray.images.to_model_input` (the serving path), and normalised per batch; at 64 px a 10k-item
catalog is ~120 MB, so training steps do no JPEG decoding. Normalisation is the model's own
(:meth:`visuray.images.InputSpec.normalise`: its weights' mean and std).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Literal

from PIL import Image

if TYPE_CHECKING:
    import torch

Split = Literal["train", "val", "test"]


def split_of(item_id: str, seed: int, val_fraction: float, test_fraction: float) -> Split:
    """The split of one product: a uniform hash in [0, 1) against the split fractions."""
    digest = hashlib.sha256(f"split:{seed}:{item_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "little") / 2**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def decode_to_uint8(
    images: Sequence[bytes],
    img_size: int,
    edit: Callable[[Image.Image, int], Image.Image] | None = None,
) -> torch.Tensor:
    """Decode encoded images (optionally ``edit(image, index)``, e.g. a wild background) into uint8."""
    from visuray.images import center_crop_uint8, decode_image

    decoded = []
    for i, data in enumerate(images):
        img = decode_image(data)
        decoded.append(edit(img, i) if edit is not None else img)
    return center_crop_uint8(decoded, img_size)


def augment(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Horizontal flips and small random shifts (reflect-padded), on the uint8 batch: attributes survive
    both, and the step stays cheap next to the model."""
    import torch
    from torch.nn import functional as F

    n, _, size, _ = batch.shape
    flip = torch.rand(n, generator=generator) < 0.5
    batch = torch.where(flip[:, None, None, None], batch.flip(-1), batch)
    pad = max(size // 16, 1)
    padded = F.pad(batch.float(), (pad, pad, pad, pad), mode="reflect")
    dx, dy = torch.randint(0, 2 * pad + 1, (2,), generator=generator).tolist()
    return padded[:, :, dy : dy + size, dx : dx + size].round().to(torch.uint8)


def batch_indices(num_items: int, batch_size: int, seed: int, step: int) -> list[int]:
    """The items of training step ``step``: a fixed function of (seed, step), so a resumed run sees the
    batches the uninterrupted one would have seen. Epochs are seeded permutations, cut into batches."""
    import torch

    per_epoch = max(num_items // batch_size, 1)
    epoch, position = divmod(step, per_epoch)
    order = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    start = position * batch_size
    picked = order[start : start + batch_size]
    if len(picked) < batch_size:  # catalog smaller than a batch: wrap around
        picked = order[torch.arange(start, start + batch_size) % num_items]
    return picked.tolist()
