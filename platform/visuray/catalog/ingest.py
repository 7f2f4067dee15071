"""The ingest job: an image folder, or images plus a metadata CSV, into a published Parquet catalog.

Two source layouts are understood:

* **image folder** (``metadata_csv`` unset): ``<source>/<class>/<file>`` (the class folder is both the
  label and the category), ``<source>/<file>`` (no label), or, with ``split_from_folders``,
  ``<source>/<split>/<class>/<file>`` (the split goes into ``attributes["split"]``). Item ids are the
  file's path below ``source`` without its extension, so they are unique and stable across re-ingests.
* **images + metadata CSV** (``metadata_csv`` set): one CSV row per item; the column mapping says which
  column holds the id, the image path (relative to ``source``), the label, the category, the title and
  the description; other columns become attributes.

Every image is decoded once (:func:`visuray.images.decode_image`) to prove it is usable; a file that is
missing, empty, truncated, not an image or a decompression bomb is skipped, logged and listed (path and
reason) in the ingest report, which is stored in the catalog's manifest. One bad file never stops the
job; a source with no usable image at all is an error and publishes nothing.

This runs as plain Python in the job's driver, not as a Ray Data pipeline: decoding ~10k small catalog
photos takes well under a minute on one core, and a single writer keeps shard order and item order
deterministic. Catalogs of millions of images would move the per-image work into ``ray.data.map_batches``
behind the same :func:`run_ingest`.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import posixpath
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import fsspec
from pydantic import Field

from visuray.catalog.schema import CatalogRecord, write_catalog
from visuray.config import StrictModel
from visuray.errors import VisurayError
from visuray.images import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image, encode_jpeg, resize_max_side
from visuray.storage import StorageOptions, full_uri, get_filesystem, is_remote

log = logging.getLogger(__name__)

# What counts as an image file when walking a folder; anything else (LICENSE, README, CSVs) is ignored,
# not reported as a broken image. Matching is case-insensitive.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")

# The manifest is read by every later stage: a source with a million broken files must not make it huge.
MAX_REPORTED_SKIPS = 1000

# ``source: bundled:clothing_small`` names a folder of the sample data shipped inside the package, so the
# demo spec works wherever visuray is installed, not only from a source checkout.
BUNDLED_PREFIX = "bundled:"


class IngestError(VisurayError, RuntimeError):
    """The source cannot be ingested at all (nothing usable, a missing CSV column); nothing is published."""


class IngestConfig(StrictModel):
    """Ingest an image folder or images + metadata CSV into a sharded Parquet catalog.

    The CSV column defaults fit ``fashion-products/metadata.csv`` (the shared development catalog):
    ``label`` is ``articleType`` (75 fine-grained classes such as "Tshirts" or "Casual Shoes"), because
    every product there has exactly one photo, so a product-id label would give every class a single
    image and nothing for metric learning to pull together; ``category`` is ``subCategory`` (30 coarser
    groups such as "Topwear"), which category-balanced batches draw from so that negatives are hard.
    """

    job: Literal["ingest"] = "ingest"
    name: str = "ingest"  # run name, shown in logs and the job summary
    storage: StorageOptions = Field(default_factory=StorageOptions)  # how to reach s3:// URIs

    source: str = Field(
        description="image folder (local path, s3:// URI or bundled:<name>); with metadata_csv, the folder "
        "that the CSV's image paths are relative to"
    )
    metadata_csv: str | None = None  # set: images + metadata CSV mode; unset: image-folder mode

    # CSV column mapping (CSV mode only). Defaults fit fashion-products, see the class docstring.
    id_column: str = "id"  # unique item id; rows repeating an id are skipped and reported
    image_column: str = "image"  # image path relative to `source` ("images/10000.jpg")
    label_column: str | None = "articleType"  # what counts as "the same item" for retrieval and metric loss
    category_column: str | None = "subCategory"  # coarser group used by category-balanced batches
    title_column: str | None = "productDisplayName"  # catalog title: weak fine-grained labels (ATL)
    description_column: str | None = None  # fashion-products has no description column
    # None: every column except id, image, title and description (label and category values included,
    # so attribute heads can predict them too); a list: exactly those columns.
    attribute_columns: list[str] | None = None

    # Image-folder mode: `<split>/<class>/<file>` layouts such as clothing-small's train/validation/test.
    split_from_folders: bool = False  # off: the folder holding a file is its class, whatever the depth
    splits: list[str] | None = None  # with split_from_folders: ingest only these splits (None: all)

    output: str = Field(description="catalog URI (local path or s3://); versions are published below it")
    shard_rows: int = Field(512, ge=1)  # ~512 small JPEGs make a few-MB shard: enough Ray Data blocks
    # Optional downscale: images whose long side exceeds this are resized and re-encoded as JPEG; smaller
    # ones keep their original bytes (no second lossy encode). None keeps every image as it is.
    resize_max_side: int | None = Field(None, ge=8)
    jpeg_quality: int = Field(
        90, ge=1, le=100
    )  # only for re-encoded (resized) images; 90 is visually lossless
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1)  # larger images are skipped as decompression bombs
    limit: int | None = Field(None, ge=1)  # stop after this many ingested items (quick runs, smoke tests)
    progress_every: int = Field(500, ge=1)  # log a progress line every N images


@dataclass(frozen=True)
class _Candidate:
    """One image to try: where it is and what the catalog row around it says."""

    item_id: str
    path: str  # path inside the source filesystem
    label: str | None = None
    category: str | None = None
    title: str | None = None
    description: str | None = None
    attributes: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Report:
    """Counts and skipped files with reasons; becomes ``manifest.metadata["ingest"]``."""

    source: str
    num_candidates: int = 0
    num_ok: int = 0
    num_skipped: int = 0
    num_resized: int = 0
    num_ignored: int = 0  # files that are not images by extension (LICENSE, README, ...)
    skipped: list[dict[str, str]] = field(default_factory=list)

    def skip(self, path: str, reason: str) -> None:
        self.num_skipped += 1
        if len(self.skipped) < MAX_REPORTED_SKIPS:
            self.skipped.append({"path": path, "reason": reason})
            log.warning("skipping %s: %s", path, reason)
        elif len(self.skipped) == MAX_REPORTED_SKIPS and self.num_skipped == MAX_REPORTED_SKIPS + 1:
            log.warning(
                "more than %d files skipped; further skips are counted, not listed", MAX_REPORTED_SKIPS
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "num_candidates": self.num_candidates,
            "num_ok": self.num_ok,
            "num_skipped": self.num_skipped,
            "num_resized": self.num_resized,
            "num_ignored": self.num_ignored,
            "skipped": list(self.skipped),
            "skipped_truncated": self.num_skipped > len(self.skipped),
        }


def resolve_source(source: str) -> str:
    """Turn ``bundled:<name>`` into the folder of that bundled sample; other URIs pass through."""
    if not source.startswith(BUNDLED_PREFIX):
        return source
    from visuray.catalog.sample import bundled_path

    return str(bundled_path(source[len(BUNDLED_PREFIX) :]))


def _child_path(fs_root: str, remote: bool, relative: str) -> str:
    return posixpath.join(fs_root, relative) if remote else os.path.normpath(os.path.join(fs_root, relative))


_MAPPED_COLUMNS = (
    "id_column",
    "image_column",
    "label_column",
    "category_column",
    "title_column",
    "description_column",
)


def _cell(row: dict[str, str], column: str | None) -> str | None:
    """A CSV cell with surrounding blanks removed; an empty cell (or no column) is a missing value."""
    if column is None:
        return None
    value = (row.get(column) or "").strip()
    return value or None


def _folder_candidates(
    fs: fsspec.AbstractFileSystem,
    root: str,
    split_from_folders: bool,
    splits: list[str] | None,
    report: _Report,
) -> list[_Candidate]:
    candidates = []
    for path in sorted(fs.find(root)):
        relative = path[len(root) :].lstrip("/")
        parts = relative.split("/")
        if any(part.startswith(".") for part in parts):
            continue  # .DS_Store, .git and editor droppings are not catalog content
        if not parts[-1].lower().endswith(IMAGE_EXTENSIONS):
            report.num_ignored += 1
            continue
        item_id = posixpath.splitext(relative)[0]
        class_name = parts[-2] if len(parts) >= 2 else None
        attributes: dict[str, Any] = {}
        if split_from_folders:
            if len(parts) != 3:
                report.skip(full_uri(report.source, path), "not laid out as <split>/<class>/<file>")
                continue
            if splits is not None and parts[0] not in splits:
                continue
            attributes["split"] = parts[0]
        candidates.append(_Candidate(item_id, path, class_name, class_name, attributes=attributes))
    return candidates


def _csv_candidates(
    cfg: IngestConfig,
    fs: fsspec.AbstractFileSystem,
    root: str,
    report: _Report,
) -> list[_Candidate]:
    assert cfg.metadata_csv is not None
    csv_fs, csv_path = get_filesystem(cfg.metadata_csv, cfg.storage)
    try:
        with csv_fs.open(csv_path, "rb") as raw:
            text = io.TextIOWrapper(raw, encoding="utf-8-sig", newline="")
            reader = csv.DictReader(text)
            header = list(reader.fieldnames or [])
            rows = list(reader)
    except FileNotFoundError:
        raise IngestError(f"metadata CSV {cfg.metadata_csv} does not exist") from None

    mapped = {name: getattr(cfg, name) for name in _MAPPED_COLUMNS}
    if cfg.attribute_columns is None:
        not_attributes = {cfg.id_column, cfg.image_column, cfg.title_column, cfg.description_column}
        attribute_columns = [c for c in header if c not in not_attributes]
    else:
        attribute_columns = list(cfg.attribute_columns)
    wanted = {key: col for key, col in mapped.items() if col is not None}
    wanted.update({f"attribute_columns[{i}]": col for i, col in enumerate(attribute_columns)})
    missing = [f"{key}={col!r}" for key, col in wanted.items() if col not in header]
    if missing:
        raise IngestError(
            f"metadata CSV {cfg.metadata_csv} lacks the column(s) {', '.join(missing)}; "
            f"it has: {', '.join(header)}"
        )

    remote = is_remote(cfg.source)
    candidates = []
    for line, row in enumerate(rows, start=2):  # line 1 is the header
        item_id, image = _cell(row, cfg.id_column), _cell(row, cfg.image_column)
        if item_id is None or image is None:
            report.skip(f"{cfg.metadata_csv}:{line}", f"empty {cfg.id_column!r} or {cfg.image_column!r} cell")
            continue
        attributes = {c: v for c in attribute_columns if (v := _cell(row, c)) is not None}
        candidates.append(
            _Candidate(
                item_id,
                _child_path(root, remote, image),
                label=_cell(row, cfg.label_column),
                category=_cell(row, cfg.category_column),
                title=_cell(row, cfg.title_column),
                description=_cell(row, cfg.description_column),
                attributes=attributes,
            )
        )
    return candidates


def _read_image(fs: fsspec.AbstractFileSystem, path: str) -> bytes:
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        raise ImageDecodeError("file not found") from None
    except IsADirectoryError:
        raise ImageDecodeError("is a directory, not a file") from None
    except OSError as exc:
        raise ImageDecodeError(f"unreadable: {exc}") from None


def _records(
    candidates: list[_Candidate],
    fs: fsspec.AbstractFileSystem,
    cfg: IngestConfig,
    report: _Report,
) -> Iterator[CatalogRecord]:
    """Validate each candidate and yield its catalog record; bad files are reported, never raised."""
    seen: set[str] = set()
    start = time.monotonic()
    total = len(candidates)
    for n, cand in enumerate(candidates, start=1):
        if n % cfg.progress_every == 0:
            rate = n / max(time.monotonic() - start, 1e-9)
            log.info(
                "ingest %r: file %d/%d (%.0f/s), %d ok, %d skipped",
                cfg.name,
                n,
                total,
                rate,
                report.num_ok,
                report.num_skipped,
            )
        where = full_uri(report.source, cand.path)
        if cand.item_id in seen:
            report.skip(where, f"duplicate item id {cand.item_id!r}")
            continue
        try:
            data = _read_image(fs, cand.path)
            img = decode_image(data, max_pixels=cfg.max_pixels)
        except ImageDecodeError as exc:
            report.skip(where, str(exc))
            continue
        if cfg.resize_max_side is not None and max(img.size) > cfg.resize_max_side:
            data = encode_jpeg(resize_max_side(img, cfg.resize_max_side), quality=cfg.jpeg_quality)
            report.num_resized += 1
        seen.add(cand.item_id)
        report.num_ok += 1
        yield CatalogRecord(
            item_id=cand.item_id,
            image=data,
            label=cand.label,
            category=cand.category,
            title=cand.title,
            description=cand.description,
            attributes=dict(cand.attributes),
            source=where,
        )
        if cfg.limit is not None and report.num_ok >= cfg.limit:
            break
    if report.num_ok == 0:
        first = (
            f" (first: {report.skipped[0]['path']}: {report.skipped[0]['reason']})" if report.skipped else ""
        )
        # Raised inside write_catalog's loop, so its writer aborts: no manifest, no LATEST.
        raise IngestError(
            f"no usable image among {report.num_candidates} candidate(s) in {report.source}: "
            f"{report.num_skipped} skipped{first}; nothing was published"
        )


def run_ingest(cfg: IngestConfig) -> dict[str, Any]:
    """Ingest ``cfg.source`` into a new catalog version at ``cfg.output`` and return the summary.

    The summary is the ingest report (``num_ok``, ``num_skipped``, ``skipped`` with path and reason, at
    most :data:`MAX_REPORTED_SKIPS` listed) plus the catalog's URI, version and size; the same report is
    stored as ``manifest.metadata["ingest"]``.
    """
    source = resolve_source(cfg.source)
    fs, root = get_filesystem(source, cfg.storage)
    report = _Report(source=full_uri(source, root if is_remote(source) else os.path.normpath(root)))
    if cfg.metadata_csv is None:
        if not fs.isdir(root):
            raise IngestError(f"source folder {source} does not exist")
        candidates = _folder_candidates(fs, root, cfg.split_from_folders, cfg.splits, report)
    else:
        candidates = _csv_candidates(cfg, fs, root, report)
    report.num_candidates = len(candidates)
    if not candidates:
        raise IngestError(f"no image files found in {source}; nothing was published")
    log.info("ingest %r: %d candidate image(s) from %s -> %s", cfg.name, len(candidates), source, cfg.output)

    # write_catalog reads `metadata` after it has consumed every record, so the report filled in by the
    # generator is complete when it lands in the manifest.
    metadata: dict[str, Any] = {}
    started = time.monotonic()

    def records_then_report() -> Iterator[CatalogRecord]:
        yield from _records(candidates, fs, cfg, report)
        metadata["ingest"] = report.to_dict()
        metadata["ingest_config"] = cfg.model_dump(mode="json", exclude={"storage"})

    artifact = write_catalog(
        records_then_report(), cfg.output, options=cfg.storage, shard_rows=cfg.shard_rows, metadata=metadata
    )
    meta = artifact.manifest.metadata
    log.info(
        "ingest %r: published %d item(s) in %d shard(s), %d skipped, version %s (%.1fs)",
        cfg.name,
        meta["num_items"],
        meta["num_shards"],
        report.num_skipped,
        artifact.manifest.version,
        time.monotonic() - started,
    )
    return {
        "job": "ingest",
        "name": cfg.name,
        "catalog": cfg.output,
        "version": artifact.manifest.version,
        "version_uri": artifact.uri,
        "num_items": meta["num_items"],
        "num_shards": meta["num_shards"],
        "num_labels": len(meta["labels"]),
        "num_categories": len(meta["categories"]),
        **report.to_dict(),
    }
