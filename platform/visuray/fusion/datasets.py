"""Composed-retrieval data: queries (reference image, modifying text, target) and labelled pairs.

Three sources:

(a) :func:`fashion_products_queries` builds queries from the *real attributes* of a catalog such as
    fashion-products. The modifying text is **templated** ("same, but in red"), not written by people;
    every report built on these queries says so. Two kinds:

    - ``type_colour``: "same article type, in <colour>": any item with the reference's article type and
      the asked colour is a correct answer (the reference itself excluded);
    - ``colour_variant``: product lines, i.e. items whose titles are equal but for the colour word
      ("Nike Men Blue T-shirt" / "Nike Men Red T-shirt"); the variant in the asked colour is the answer.

(b) Readers for the real Fashion IQ caption files (:func:`read_fashion_iq`) and for generic
    (reference, caption, target) tables such as CSS or Fashion200k (:func:`read_triplet_table`), with
    images from a folder (:class:`ImageFolder`).

(c) CFQ-style labelled pairs (:func:`labelled_pairs`): each (query, candidate) pair carries a positive or
    negative label for caption accuracy (does the candidate show what the text asks?) and one for image
    similarity (is it the reference's kind of item?).
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import random
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from visuray.errors import VisurayError
from visuray.storage import StorageOptions, get_filesystem

TEMPLATED_TEXT_NOTE = (
    "The modifying texts of these queries are templated from catalog attributes "
    "(article type, base colour, product titles), not written by people."
)

# Templates of the two query kinds; {colour} is the catalog's base colour, lowercased.
TYPE_COLOUR_TEMPLATES = (
    "same but in {colour}",
    "in {colour}",
    "make it {colour}",
    "the same kind in {colour}",
    "{colour} instead",
)
COLOUR_VARIANT_TEMPLATES = (
    "this product in {colour}",
    "same product but {colour}",
    "the {colour} version of this",
)


class DatasetFormatError(VisurayError, ValueError):
    """A caption file or triplet table that does not have the expected form; the message says where."""


@dataclass(frozen=True)
class ComposedQuery:
    """One composed query; ``relevant_ids`` are the gallery items that count as a hit (target included)."""

    reference_id: str
    text: str
    target_id: str | None  # None where the split hides it (Fashion IQ test)
    relevant_ids: tuple[str, ...]
    category: str
    kind: str


# ----------------------------------------------------------------------------------------------------
# (a) fashion-products: templated queries from real attributes
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CatalogItem:
    item_id: str
    article_type: str
    colour: str  # lowercased base colour
    category: str
    product_line: str  # title without its colour word(s), lowercased: equal for colour variants


def product_line_key(title: str, colour: str) -> str:
    """The title with the colour removed (whole words, case-insensitive) and spaces collapsed."""
    if not colour:
        return title.lower().strip()
    stripped = re.sub(rf"\b{re.escape(colour)}\b", " ", title, flags=re.IGNORECASE)
    return re.sub(r"\s+", " ", stripped).strip().lower()


def catalog_items(
    item_ids: Sequence[str],
    categories: Sequence[str | None],
    attributes: Sequence[Mapping[str, Any]],
    titles: Sequence[str | None],
    type_key: str = "articleType",
    colour_key: str = "baseColour",
) -> list[CatalogItem]:
    """Items that have both an article type and a colour (the others cannot form queries)."""
    items = []
    for item_id, category, attrs, title in zip(item_ids, categories, attributes, titles, strict=True):
        article_type, colour = attrs.get(type_key), attrs.get(colour_key)
        if not article_type or not colour or str(colour).lower() in ("nan", "none", ""):
            continue
        colour = str(colour)
        title = title if isinstance(title, str) else ""  # a missing title reads back as None or NaN
        items.append(
            CatalogItem(
                item_id=str(item_id),
                article_type=str(article_type),
                colour=colour.lower(),
                category=str(category or article_type),
                product_line=f"{article_type}|{product_line_key(title or '', colour)}" if title else "",
            )
        )
    return items


def _stable_fraction(key: str, seed: int) -> float:
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_held_out(
    items: Sequence[CatalogItem], test_fraction: float, seed: int
) -> tuple[list[CatalogItem], list[CatalogItem]]:
    """(train, test) by product line, so that no colour variant of a test product is seen in training."""
    train, test = [], []
    for item in items:
        key = item.product_line or item.item_id
        (test if _stable_fraction(key, seed) < test_fraction else train).append(item)
    return train, test


def subset_items(items: Sequence[CatalogItem], max_items: int | None, seed: int) -> list[CatalogItem]:
    """At most ``max_items`` items, whole product lines at a time (so variants stay together)."""
    if max_items is None or len(items) <= max_items:
        return list(items)
    by_line: dict[str, list[CatalogItem]] = defaultdict(list)
    for item in items:
        by_line[item.product_line or item.item_id].append(item)
    lines = sorted(by_line, key=lambda k: _stable_fraction(k, seed + 1))
    out: list[CatalogItem] = []
    for line in lines:
        if len(out) + len(by_line[line]) > max_items:
            continue
        out.extend(by_line[line])
    return out


def fashion_products_queries(
    items: Sequence[CatalogItem],
    kinds: Sequence[str] = ("type_colour", "colour_variant"),
    seed: int = 0,
    type_colour_per_item: int = 1,
    min_relevant: int = 1,
) -> list[ComposedQuery]:
    """Templated composed queries among ``items`` (one split: references and answers come from it).

    ``type_colour``: for each item, ``type_colour_per_item`` colours other than its own among the colours
    its article type has in ``items``; relevant = items of that type in that colour. ``colour_variant``:
    for each item of a product line with several colours, one query per other colour of the line.
    """
    unknown = set(kinds) - {"type_colour", "colour_variant"}
    if unknown:
        raise ValueError(f"unknown query kinds {sorted(unknown)}; use type_colour and/or colour_variant")
    rng = random.Random(seed)
    by_type_colour: dict[tuple[str, str], list[str]] = defaultdict(list)
    by_line_colour: dict[tuple[str, str], list[str]] = defaultdict(list)
    for item in items:
        by_type_colour[(item.article_type, item.colour)].append(item.item_id)
        if item.product_line:
            by_line_colour[(item.product_line, item.colour)].append(item.item_id)
    colours_of_type: dict[str, list[str]] = defaultdict(list)
    for article_type, colour in sorted(by_type_colour):
        colours_of_type[article_type].append(colour)
    colours_of_line: dict[str, list[str]] = defaultdict(list)
    for line, colour in sorted(by_line_colour):
        colours_of_line[line].append(colour)

    queries: list[ComposedQuery] = []
    for item in items:
        if "type_colour" in kinds:
            others = [c for c in colours_of_type[item.article_type] if c != item.colour]
            for colour in rng.sample(others, min(type_colour_per_item, len(others))):
                relevant = tuple(by_type_colour[(item.article_type, colour)])
                if len(relevant) < min_relevant:
                    continue
                queries.append(
                    ComposedQuery(
                        reference_id=item.item_id,
                        text=rng.choice(TYPE_COLOUR_TEMPLATES).format(colour=colour),
                        target_id=rng.choice(relevant),
                        relevant_ids=relevant,
                        category=item.category,
                        kind="type_colour",
                    )
                )
        if "colour_variant" in kinds and item.product_line:
            for colour in colours_of_line[item.product_line]:
                if colour == item.colour:
                    continue
                relevant = tuple(by_line_colour[(item.product_line, colour)])
                queries.append(
                    ComposedQuery(
                        reference_id=item.item_id,
                        text=rng.choice(COLOUR_VARIANT_TEMPLATES).format(colour=colour),
                        target_id=relevant[0],
                        relevant_ids=relevant,
                        category=item.category,
                        kind="colour_variant",
                    )
                )
    return queries


# ----------------------------------------------------------------------------------------------------
# (b) Fashion IQ caption files, generic triplet tables, image folders
# ----------------------------------------------------------------------------------------------------

FASHION_IQ_CATEGORIES = ("dress", "shirt", "toptee")


@dataclass(frozen=True)
class CaptionedTriplet:
    """A Fashion IQ record: ``candidate`` is the reference image id, ``captions`` the two edits."""

    candidate: str
    target: str | None
    captions: tuple[str, ...]
    category: str

    def text(self, joiner: str = " and ") -> str:
        """The captions joined into one modifying text (the usual way Fashion IQ models read both)."""
        return joiner.join(c.strip() for c in self.captions if c and c.strip())

    def to_query(self) -> ComposedQuery:
        relevant = (self.target,) if self.target else ()
        return ComposedQuery(self.candidate, self.text(), self.target, relevant, self.category, "fashion_iq")


def _read_json(uri: str, options: StorageOptions | None) -> Any:
    fs, path = get_filesystem(uri, options)
    try:
        raw = fs.cat_file(path)
    except FileNotFoundError:
        raise DatasetFormatError(f"no file at {uri}") from None
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise DatasetFormatError(f"{uri} is not valid JSON: {exc}") from None


def parse_fashion_iq_records(records: Any, category: str, source: str) -> list[CaptionedTriplet]:
    """Validate the records of one caption file: a list of {candidate, [target], captions: [str, ...]}."""
    if not isinstance(records, list):
        raise DatasetFormatError(f"{source}: expected a JSON list of records, got {type(records).__name__}")
    out = []
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise DatasetFormatError(f"{source}: record {i} is not an object")
        candidate, target, captions = record.get("candidate"), record.get("target"), record.get("captions")
        if not isinstance(candidate, str) or not candidate:
            raise DatasetFormatError(f"{source}: record {i} has no 'candidate' image id")
        if target is not None and not isinstance(target, str):
            raise DatasetFormatError(f"{source}: record {i} has a non-string 'target'")
        if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
            raise DatasetFormatError(f"{source}: record {i} has no list of string 'captions'")
        out.append(CaptionedTriplet(candidate, target or None, tuple(captions), category))
    return out


def fashion_iq_caption_uri(root: str, category: str, split: str) -> str:
    return posixpath.join(root.rstrip("/"), "captions", f"cap.{category}.{split}.json")


def read_fashion_iq(
    root: str,
    split: str = "val",
    categories: Sequence[str] = FASHION_IQ_CATEGORIES,
    options: StorageOptions | None = None,
) -> list[CaptionedTriplet]:
    """The records of ``captions/cap.<category>.<split>.json`` under ``root`` (path or s3://).

    Test files have no ``target``: their triplets have ``target=None`` and no relevant ids.
    """
    if split not in ("train", "val", "test"):
        raise ValueError(f"Fashion IQ split {split!r}: use train, val or test")
    out: list[CaptionedTriplet] = []
    for category in categories:
        uri = fashion_iq_caption_uri(root, category, split)
        out.extend(parse_fashion_iq_records(_read_json(uri, options), category, uri))
    return out


def read_fashion_iq_split(
    root: str, category: str, split: str, options: StorageOptions | None = None
) -> list[str]:
    """The image ids of ``image_splits/split.<category>.<split>.json``: the retrieval gallery."""
    uri = posixpath.join(root.rstrip("/"), "image_splits", f"split.{category}.{split}.json")
    ids = _read_json(uri, options)
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise DatasetFormatError(f"{uri}: expected a JSON list of image ids")
    return ids


def read_triplet_table(
    uri: str,
    reference_column: str = "reference",
    caption_column: str = "caption",
    target_column: str = "target",
    category_column: str | None = None,
    options: StorageOptions | None = None,
) -> list[ComposedQuery]:
    """(reference, caption, target) rows from CSV, TSV, JSON lines or Parquet (by extension), e.g. CSS or
    Fashion200k triplets exported to a table. A missing category column puts every row in ``all``."""
    import pandas as pd

    fs, path = get_filesystem(uri, options)
    readers = {".csv": pd.read_csv, ".tsv": lambda f: pd.read_csv(f, sep="\t"), ".parquet": pd.read_parquet}
    readers[".jsonl"] = lambda f: pd.read_json(f, lines=True)
    ext = posixpath.splitext(path)[1].lower()
    if ext not in readers:
        raise DatasetFormatError(f"{uri}: unsupported table type {ext!r}; use {', '.join(sorted(readers))}")
    try:
        with fs.open(path, "rb") as fh:
            frame = readers[ext](fh)
    except FileNotFoundError:
        raise DatasetFormatError(f"no file at {uri}") from None
    needed = [reference_column, caption_column, target_column] + (
        [category_column] if category_column else []
    )
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise DatasetFormatError(f"{uri}: missing column(s) {missing}; it has {list(frame.columns)}")
    out = []
    for i, row in enumerate(frame.itertuples(index=False)):
        values = row._asdict() if hasattr(row, "_asdict") else dict(zip(frame.columns, row, strict=True))
        reference, target = values.get(reference_column), values.get(target_column)
        if pd.isna(reference) or pd.isna(target):
            raise DatasetFormatError(f"{uri}: row {i} lacks a reference or a target")
        caption = "" if pd.isna(values.get(caption_column)) else str(values[caption_column])
        category = str(values[category_column]) if category_column else "all"
        out.append(ComposedQuery(str(reference), caption, str(target), (str(target),), category, "table"))
    return out


class ImageFolder:
    """Images named by id in a folder (path or s3://): ``<root>/<id>.<ext>``, or ``<root>/<id>`` itself.

    The folder is listed once; :meth:`read` of an id without a file raises :class:`KeyError` with the
    id, and :meth:`missing` lists the ids of a query set that have no image (to report, not to crash on).
    """

    EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")

    def __init__(self, root: str, options: StorageOptions | None = None) -> None:
        self.root = root
        self.fs, self._path = get_filesystem(root, options)
        if not self.fs.isdir(self._path):
            raise DatasetFormatError(f"image folder {root} does not exist")
        self._files: dict[str, str] = {}
        for path in sorted(self.fs.find(self._path)):
            rel = (
                posixpath.relpath(path, self._path)
                if "://" not in root
                else path[len(self._path) :].lstrip("/")
            )
            stem, ext = posixpath.splitext(rel)
            if ext.lower() in self.EXTENSIONS:
                self._files.setdefault(stem, path)
                self._files.setdefault(rel, path)

    def __contains__(self, image_id: str) -> bool:
        return image_id in self._files

    def __len__(self) -> int:
        return len({v for v in self._files.values()})

    def read(self, image_id: str) -> bytes:
        if image_id not in self._files:
            raise KeyError(f"no image for id {image_id!r} in {self.root}")
        return self.fs.cat_file(self._files[image_id])

    def missing(self, queries: Iterable[ComposedQuery]) -> list[str]:
        ids = set()
        for q in queries:
            ids.add(q.reference_id)
            ids.update(q.relevant_ids)
        return sorted(i for i in ids if i not in self._files)


def keep_queries_with_images(
    queries: Sequence[ComposedQuery], available: Iterable[str] | ImageFolder
) -> tuple[list[ComposedQuery], int]:
    """Queries whose reference and target have images (relevant ids without one are dropped); and how
    many queries were left out."""
    have = available if isinstance(available, ImageFolder) else set(available)
    kept = []
    for q in queries:
        relevant = tuple(r for r in q.relevant_ids if r in have)
        if q.reference_id in have and relevant:
            kept.append(ComposedQuery(q.reference_id, q.text, q.target_id, relevant, q.category, q.kind))
    return kept, len(queries) - len(kept)


# ----------------------------------------------------------------------------------------------------
# (c) CFQ-style labelled pairs
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelledPair:
    """A (query, candidate) pair; a label is True (positive), False (negative) or None (not judged)."""

    query_index: int
    candidate_id: str
    caption_match: bool | None  # does the candidate show what the text asks for?
    image_similar: bool | None  # is it the same kind of item as the reference image?


def labelled_pairs(
    queries: Sequence[ComposedQuery],
    items: Sequence[CatalogItem],
    candidates_per_group: int = 2,
    seed: int = 0,
) -> list[LabelledPair]:
    """CFQ-style candidates for ``type_colour`` queries, labelled from real attributes.

    For each query, up to ``candidates_per_group`` candidates of each of four groups: same type and asked
    colour (caption +, image +), same type other colour (caption -, image +), other type in the asked
    colour (caption +, image -), other type and colour (caption -, image -). The reference is never a
    candidate. Caption accuracy here is colour only: the text asks for nothing else.
    """
    rng = random.Random(seed)
    by_id = {item.item_id: item for item in items}
    by_type: dict[str, list[str]] = defaultdict(list)
    by_colour: dict[str, list[str]] = defaultdict(list)
    for item in items:
        by_type[item.article_type].append(item.item_id)
        by_colour[item.colour].append(item.item_id)
    all_ids = [item.item_id for item in items]
    pairs: list[LabelledPair] = []
    for qi, query in enumerate(queries):
        if query.kind != "type_colour" or query.reference_id not in by_id:
            continue
        reference = by_id[query.reference_id]
        asked = {by_id[r].colour for r in query.relevant_ids if r in by_id}

        def labels(
            candidate: str, reference: CatalogItem = reference, asked: set[str] = asked
        ) -> tuple[bool, bool]:
            item = by_id[candidate]
            return item.colour in asked, item.article_type == reference.article_type

        # Each group is drawn from a list that holds it, its members recognised by their labels.
        pools = {
            (True, True): by_type[reference.article_type],
            (False, True): by_type[reference.article_type],
            (True, False): [i for c in sorted(asked) for i in by_colour[c]],
            (False, False): all_ids,
        }
        for key, pool in pools.items():
            # Rejection sampling keeps this O(candidates) per query, not O(catalog).
            picked: list[str] = []
            for _ in range(50 * candidates_per_group):
                if len(picked) == candidates_per_group or not pool:
                    break
                candidate = pool[rng.randrange(len(pool))]
                if candidate != reference.item_id and candidate not in picked and labels(candidate) == key:
                    picked.append(candidate)
            pairs.extend(LabelledPair(qi, candidate, *key) for candidate in picked)
    return pairs
