"""The catalog's row schema and its writer.

A catalog is a published artifact (see :mod:`visuray.storage`) whose files are Parquet shards
``part-00000.parquet`` ... plus ``labels.json``; the manifest's metadata holds the row count, the label
and category vocabularies and the ingest report (skipped files with their reasons).
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from visuray.storage import Artifact, ArtifactWriter, StorageOptions

CATALOG_KIND = "catalog"

CATALOG_SCHEMA = pa.schema(
    [
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),  # encoded JPEG/PNG bytes, as ingested
        pa.field("label", pa.string()),  # class or product id: what counts as "the same item"
        pa.field("category", pa.string()),  # coarser product category (article type, folder name)
        pa.field("title", pa.string()),
        pa.field("description", pa.string()),
        pa.field("attributes", pa.string()),  # JSON object of attribute name -> value
        pa.field("source", pa.string()),  # where the image came from (path or URI), for reports
    ]
)


@dataclass
class CatalogRecord:
    item_id: str
    image: bytes
    label: str | None = None
    category: str | None = None
    title: str | None = None
    description: str | None = None
    attributes: dict[str, Any] = field(default_factory=dict)
    source: str | None = None

    def to_row(self) -> dict[str, Any]:
        row = asdict(self)
        row["attributes"] = json.dumps(self.attributes, sort_keys=True)
        return row


def _table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=CATALOG_SCHEMA)


def _shard_bytes(rows: list[dict[str, Any]]) -> bytes:
    buf = io.BytesIO()
    pq.write_table(_table(rows), buf, compression="zstd")
    return buf.getvalue()


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def write_catalog(
    records: Iterable[CatalogRecord],
    uri: str,
    options: StorageOptions | None = None,
    shard_rows: int = 512,
    metadata: Mapping[str, Any] | None = None,
) -> Artifact:
    """Write records as sharded Parquet and publish the catalog (manifest last).

    An exception while records are produced aborts the write: nothing is published and the partial
    version folder is removed.
    """
    labels: set[str] = set()
    categories: set[str] = set()
    rows: list[dict[str, Any]] = []
    ids: set[str] = set()
    count = 0
    shard = 0
    with ArtifactWriter(uri, CATALOG_KIND, options) as writer:
        for record in records:
            if record.item_id in ids:
                raise ValueError(f"duplicate item_id {record.item_id!r} in catalog {uri}")
            ids.add(record.item_id)
            if record.label is not None:
                labels.add(record.label)
            if record.category is not None:
                categories.add(record.category)
            rows.append(record.to_row())
            count += 1
            if len(rows) >= shard_rows:
                writer.write_bytes(shard_name(shard), _shard_bytes(rows))
                shard += 1
                rows = []
        if rows:
            writer.write_bytes(shard_name(shard), _shard_bytes(rows))
            shard += 1
        if count == 0:
            raise ValueError(f"no items to write to catalog {uri}")
        vocab = {"labels": sorted(labels), "categories": sorted(categories)}
        writer.write_text("labels.json", json.dumps(vocab, indent=1))
        meta = {"num_items": count, "num_shards": shard, **vocab, **dict(metadata or {})}
        return writer.publish(meta)


def iter_rows(artifact: Artifact, columns: list[str] | None = None) -> Iterator[dict[str, Any]]:
    """Rows of a published catalog, shard by shard, each shard checked against its checksum."""
    for name in sorted(n for n in artifact.manifest.files if n.endswith(".parquet")):
        table = pq.read_table(io.BytesIO(artifact.read(name)), columns=columns)
        yield from table.to_pylist()
