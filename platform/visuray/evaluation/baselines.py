"""The trivial baselines every quality table sits beside, and in-process embedding of a few thousand encoded
images (report tables, benchmarks): raw pixels, and a torch module fed its own preprocessing."""

from __future__ import annotations

from typing import Any

import numpy as np

from visuray.images import InputSpec


def embed_images_in_process(
    images: list[bytes], embed: Any, spec: InputSpec | int, batch: int = 64
) -> np.ndarray:
    """Embed encoded images with a torch module in this process (for small report-side baselines), fed
    as the model expects (``spec``: its input size, mean and std)."""
    import torch

    from visuray.images import encoded_image_batches

    out = []
    with torch.no_grad():
        for x in encoded_image_batches(images, spec, batch):
            out.append(embed(x).float().numpy())
    return np.concatenate(out)


def raw_pixel_embedding(images: list[bytes], size: int = 16) -> np.ndarray:
    """The trivial baseline: the image downsampled to size x size RGB, mean-centred, L2-normalised."""
    from visuray.images import decode_image

    rows = []
    for data in images:
        img = decode_image(data).resize((size, size))
        v = np.asarray(img, dtype=np.float32).ravel()
        v -= v.mean()
        rows.append(v / (np.linalg.norm(v) + 1e-8))
    return np.stack(rows)
