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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from PIL import Image

from visuray.attributes.config import AttributeArchitecture, AttributeModelConfig, GroupHead, SplitSection
from visuray.attributes.labels import (
    AttributeGroupSpec,
    LabelGroup,
    LabelSpace,
    build_label_space,
    encode_targets,
)
from visuray.storage import StorageOptions

if TYPE_CHECKING:
    import torch

    from visuray.catalog.readers import CatalogRows

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


def row_metadata(rows: CatalogRows) -> list[dict[str, Any]]:
    """What label groups read from each row: ``label``, ``category`` (names) and ``attributes``."""
    return [
        {
            "label": rows.label_names[lab] if lab >= 0 else None,
            "category": rows.category_names[cat] if cat >= 0 else None,
            "attributes": attrs,
        }
        for lab, cat, attrs in zip(rows.labels, rows.categories, rows.attributes, strict=True)
    ]


def split_indices(item_ids: Sequence[str], split: SplitSection) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for i, item_id in enumerate(item_ids):
        out[split_of(item_id, split.seed, split.val_fraction, split.test_fraction)].append(i)
    return out


def resolve_model_config(
    arch: AttributeArchitecture, specs: Sequence[AttributeGroupSpec], space: LabelSpace
) -> AttributeModelConfig:
    """The buildable model config: the architecture plus each group's labels and depth."""
    depth = {spec.name: spec.depth for spec in specs}
    groups = [GroupHead(name=g.name, labels=list(g.labels), depth=depth[g.name]) for g in space.groups]
    return AttributeModelConfig(**arch.model_dump(), groups=groups)


def label_space_of(model_cfg: AttributeModelConfig) -> LabelSpace:
    return LabelSpace(tuple(LabelGroup(g.name, tuple(g.labels)) for g in model_cfg.groups))


@dataclass
class PreparedCatalog:
    """A catalog in memory with its splits, label space and targets."""

    rows: CatalogRows
    splits: dict[str, list[int]]
    space: LabelSpace
    targets: np.ndarray  # (N, L) for every row
    known: np.ndarray


def prepare_catalog(
    catalog: str,
    options: StorageOptions | None,
    specs: Sequence[AttributeGroupSpec],
    split: SplitSection,
    min_count: int,
    space: LabelSpace | None = None,
) -> PreparedCatalog:
    """Read and split the catalog; the label space comes from the training split unless given."""
    from visuray.catalog.readers import CatalogRows

    rows = CatalogRows(catalog, options)
    meta = row_metadata(rows)
    splits = split_indices(rows.item_ids, split)
    if space is None:
        space = build_label_space([meta[i] for i in splits["train"]], specs, min_count)
    targets, known = encode_targets(meta, specs, space)
    return PreparedCatalog(rows, splits, space, targets, known)
