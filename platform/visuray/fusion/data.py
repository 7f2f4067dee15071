"""What the ``train_fusion`` job reads: the catalog's items and text, the templated composed queries
(:mod:`visuray.fusion.datasets`) split into training and held-out product lines, the tokenizer, and the
images decoded once into a uint8 tensor.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from visuray.fusion.config import DataSection, FusionTrainConfig
from visuray.fusion.datasets import (
    CatalogItem,
    ComposedQuery,
    catalog_items,
    fashion_products_queries,
    split_held_out,
    subset_items,
)
from visuray.images import InputSpec
from visuray.storage import StorageOptions

if TYPE_CHECKING:
    import torch

    from visuray.fusion.tokenizer import TextTokenizer


@dataclass
class FusionData:
    train_items: list[CatalogItem]
    test_items: list[CatalogItem]
    train_queries: list[ComposedQuery]
    test_queries: list[ComposedQuery]
    val_items: list[CatalogItem] = field(default_factory=list)  # empty without data.val_fraction
    val_queries: list[ComposedQuery] = field(default_factory=list)

    @property
    def gallery_ids(self) -> list[str]:
        return [item.item_id for item in self.test_items]

    def held_out(self, split: str) -> tuple[list[CatalogItem], list[ComposedQuery]]:
        """The items (the gallery) and queries of a held-out split: "test" or "val"."""
        return (self.test_items, self.test_queries) if split == "test" else (self.val_items, self.val_queries)

    def all_ids(self) -> list[str]:
        return [item.item_id for item in self.train_items + self.val_items + self.test_items]


def load_items(
    catalog: str, data: DataSection, options: StorageOptions | None = None
) -> tuple[list[CatalogItem], list[str]]:
    """The catalog's items with a type and a colour, and its titles (tokenizer training text)."""
    from visuray.catalog.readers import load_catalog_frame

    frame = load_catalog_frame(catalog, options, columns=["item_id", "category", "title", "attributes"])
    items = catalog_items(
        list(frame["item_id"]),
        list(frame["category"]),
        list(frame["attributes"]),
        list(frame["title"]),
        data.type_key,
        data.colour_key,
    )
    if not items:
        raise ValueError(
            f"catalog {catalog} has no item with both {data.type_key!r} and {data.colour_key!r} attributes"
        )
    texts = [t for t in frame["title"] if t] + [
        str(v) for attrs in frame["attributes"] for v in attrs.values() if v is not None
    ]
    return items, texts


def build_fusion_data(items: Sequence[CatalogItem], data: DataSection) -> FusionData:
    """Subset, split by product line, and the templated queries of each split (deterministic)."""
    subset = subset_items(items, data.max_items, data.seed)
    train_items, test_items = split_held_out(subset, data.test_fraction, data.seed)
    val_items: list[CatalogItem] = []
    if data.val_fraction > 0:  # whole product lines again, from the training side only
        # Salt seed + 2: subset_items ranks lines by the seed + 1 hash and keeps the lowest, so splitting
        # with that hash again would put every kept line in validation.
        train_items, val_items = split_held_out(train_items, data.val_fraction, data.seed + 2)

    def queries(split: Sequence[CatalogItem], offset: int) -> list[ComposedQuery]:
        return fashion_products_queries(split, data.kinds, data.seed + offset, data.type_colour_per_item)

    fusion_data = FusionData(
        train_items,
        test_items,
        queries(train_items, 0),
        queries(test_items, 1),
        val_items,
        queries(val_items, 2) if val_items else [],
    )
    empty = [
        name
        for name, wanted, found in (
            ("training", True, fusion_data.train_queries),
            ("held-out", True, fusion_data.test_queries),
            ("validation", data.val_fraction > 0, fusion_data.val_queries),
        )
        if wanted and not found
    ]
    if empty:
        raise ValueError(
            f"no queries in the {empty[0]} split: {len(train_items)} train / {len(val_items)} validation / "
            f"{len(test_items)} test items; raise data.max_items"
        )
    return fusion_data


def prepare_tokenizer(cfg: FusionTrainConfig, texts: Sequence[str], data: FusionData) -> TextTokenizer:
    """The tokenizer file if given, else the text-init artifact's, else one trained on catalog text."""
    from visuray.fusion.model import read_tokenizer, resolve_fusion_model
    from visuray.fusion.tokenizer import TextTokenizer, train_tokenizer

    max_length = cfg.model.text.max_length
    if cfg.tokenizer.path:
        return TextTokenizer.load(cfg.tokenizer.path, max_length, cfg.storage)
    if cfg.text_init_from:
        return read_tokenizer(resolve_fusion_model(cfg.text_init_from, cfg.storage), max_length)
    corpus = list(texts) + [q.text for q in data.train_queries]
    return TextTokenizer(
        train_tokenizer(corpus, cfg.tokenizer.vocab_size, cfg.tokenizer.min_frequency), max_length
    )


class ImageTensorCache:
    """The images of some catalog items, decoded once into a uint8 (N, 3, S, S) tensor.

    Same pixels-to-tensor path as :func:`visuray.images.to_model_input` (shorter side to S, centre crop,
    the model's own normalisation ``spec``), so training, evaluation and the predictor see identical inputs.
    """

    def __init__(
        self,
        catalog: str,
        item_ids: Sequence[str],
        spec: InputSpec,
        options: StorageOptions | None = None,
    ) -> None:
        from visuray.catalog.readers import CatalogRows
        from visuray.images import center_crop_uint8

        rows = CatalogRows(catalog, options)
        row_of = {item_id: i for i, item_id in enumerate(rows.item_ids)}
        unknown = [i for i in item_ids if i not in row_of]
        if unknown:
            raise KeyError(f"{len(unknown)} item id(s) not in catalog {catalog}, e.g. {unknown[:3]}")
        self.ids = list(dict.fromkeys(item_ids))
        self.position = {item_id: i for i, item_id in enumerate(self.ids)}
        self.spec = spec
        self.pixels = center_crop_uint8([rows.image(row_of[i]) for i in self.ids], spec.img_size)

    def batch(self, item_ids: Sequence[str], flip: Any = None) -> torch.Tensor:
        """Normalised float images of ``item_ids``; ``flip`` is a bool tensor of rows to mirror."""
        import torch

        x = self.pixels[[self.position[i] for i in item_ids]]
        if flip is not None:
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        return self.spec.normalise(x)
