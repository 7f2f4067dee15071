"""The label space of an attribute model: groups of binary labels read from catalog rows.

A group (``gender``, ``colour``, ``body_region``) reads one value per item, from a key of the row's
``attributes`` JSON or from the row's ``label`` / ``category`` field, optionally maps it through
``value_map`` (one raw value may stand for several labels, e.g. a dress is both ``upper body`` and
``lower body``), and turns it into ``group=value`` labels. Every label is its own sigmoid: the model is
multi-label even where the metadata happens to give one value per group.

Labels come from the *training* rows only, and only values seen at least ``min_count`` times become
labels (rarer values cannot be learnt or scored; items carrying them are negatives for every label of the
group). An item whose group value is missing, or has no entry in ``value_map``, is *unknown* for the
whole group: its entries are masked out of the loss and the metrics rather than counted as negatives.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import Field

from visuray.config import StrictModel

ROW_FIELDS = ("label", "category")  # group columns that name a catalog field instead of an attribute key
SEPARATOR = "="


class AttributeGroupSpec(StrictModel):
    """One attribute group: where its values come from and where its head sits in the backbone."""

    name: str = Field(..., min_length=1, description="group name; labels are named '<name>=<value>'")
    column: str = Field(
        ...,
        min_length=1,
        description="key of the row's attributes JSON (e.g. baseColour), or 'label' / 'category' for those "
        "catalog fields (folder-ingested catalogs keep their class there)",
    )
    depth: int | None = Field(
        None,
        ge=1,
        description="backbone tap the group's head reads, counted from 1 (ViT: after block N; CNN: stage "
        "N of timm's feature_info); None = the last. Coarse or low-level groups (colour) may do as well "
        "from earlier taps, which the depth sweep measures",
    )
    value_map: dict[str, list[str]] | None = Field(
        None,
        description="raw value -> the label values it stands for (derived groups); raw values without an "
        "entry make the item unknown for this group. None keeps raw values as they are",
    )


def fashion_groups() -> list[AttributeGroupSpec]:
    """The fashion-products groups: gender, category, article type, colour, usage, season."""
    columns = {
        "gender": "gender",
        "category": "subCategory",
        "article_type": "articleType",
        "colour": "baseColour",
        "usage": "usage",
        "season": "season",
    }
    return [AttributeGroupSpec(name=name, column=column) for name, column in columns.items()]


# clothing-small has one class per photo (its folder). Besides the class itself, two groups are derived
# from it so the demo model has a genuinely multi-label group (a dress covers both body regions) and one
# that is coarser than the class.
CLOTHING_BODY_REGION: dict[str, list[str]] = {
    "t-shirt": ["upper body"],
    "shirt": ["upper body"],
    "longsleeve": ["upper body"],
    "outwear": ["upper body"],
    "dress": ["upper body", "lower body"],
    "pants": ["lower body"],
    "shorts": ["lower body"],
    "skirt": ["lower body"],
    "shoes": ["footwear"],
    "hat": ["headwear"],
}
CLOTHING_SLEEVES: dict[str, list[str]] = {
    "t-shirt": ["short"],
    "longsleeve": ["long"],
    "outwear": ["long"],
    # shirts and dresses come with either: unknown, not negative
    "pants": ["none"],
    "shorts": ["none"],
    "skirt": ["none"],
    "shoes": ["none"],
    "hat": ["none"],
}


def clothing_small_groups() -> list[AttributeGroupSpec]:
    """The demo groups for clothing-small: the garment class, body region and sleeve length derived from it."""
    return [
        AttributeGroupSpec(name="garment", column="label"),
        AttributeGroupSpec(name="body_region", column="label", value_map=CLOTHING_BODY_REGION),
        AttributeGroupSpec(name="sleeves", column="label", value_map=CLOTHING_SLEEVES),
    ]


def group_values(row: Mapping[str, Any], spec: AttributeGroupSpec) -> list[str] | None:
    """The group's values for one catalog row (a dict with ``attributes``); None when unknown."""
    if spec.column in ROW_FIELDS:
        raw = row.get(spec.column)
    else:
        raw = (row.get("attributes") or {}).get(spec.column)
    if raw is None or (isinstance(raw, float) and np.isnan(raw)) or str(raw).strip() == "":
        return None
    raw = str(raw).strip()
    if spec.value_map is None:
        return [raw]
    return spec.value_map.get(raw)


@dataclass(frozen=True)
class LabelGroup:
    name: str
    labels: tuple[str, ...]  # full label names, '<group>=<value>'


@dataclass(frozen=True)
class LabelSpace:
    """Groups in order; the model's logits are the groups' labels concatenated in this order."""

    groups: tuple[LabelGroup, ...]

    @property
    def names(self) -> list[str]:
        return [label for group in self.groups for label in group.labels]

    def group_slices(self) -> dict[str, slice]:
        out, start = {}, 0
        for group in self.groups:
            out[group.name] = slice(start, start + len(group.labels))
            start += len(group.labels)
        return out

    def __len__(self) -> int:
        return sum(len(g.labels) for g in self.groups)


def label_name(group: str, value: str) -> str:
    return f"{group}{SEPARATOR}{value}"


def build_label_space(
    rows: Sequence[Mapping[str, Any]], specs: Sequence[AttributeGroupSpec], min_count: int
) -> LabelSpace:
    """Labels from ``rows`` (the training split): per group, the values seen at least ``min_count`` times,
    in descending frequency (ties by name). A group left without labels is an error that names it."""
    groups = []
    for spec in specs:
        counts: Counter[str] = Counter()
        for row in rows:
            counts.update(group_values(row, spec) or [])
        kept = sorted((v for v, n in counts.items() if n >= min_count), key=lambda v: (-counts[v], v))
        if not kept:
            raise ValueError(
                f"attribute group {spec.name!r} (column {spec.column!r}) has no value with at least "
                f"{min_count} training items; lower labels.min_count or drop the group"
            )
        groups.append(LabelGroup(spec.name, tuple(label_name(spec.name, v) for v in kept)))
    return LabelSpace(tuple(groups))


def encode_targets(
    rows: Sequence[Mapping[str, Any]], specs: Sequence[AttributeGroupSpec], space: LabelSpace
) -> tuple[np.ndarray, np.ndarray]:
    """``(targets, known)``, both (N, L): 1/0 targets (float32) and whether each entry is known (bool)."""
    by_name = {spec.name: spec for spec in specs}
    slices = space.group_slices()
    targets = np.zeros((len(rows), len(space)), dtype=np.float32)
    known = np.zeros((len(rows), len(space)), dtype=bool)
    for group in space.groups:
        spec, where = by_name[group.name], slices[group.name]
        position = {label: where.start + i for i, label in enumerate(group.labels)}
        for i, row in enumerate(rows):
            values = group_values(row, spec)
            if values is None:
                continue
            known[i, where] = True
            for value in values:
                column = position.get(label_name(group.name, value))
                if column is not None:
                    targets[i, column] = 1.0
    return targets, known
