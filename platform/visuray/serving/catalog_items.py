"""Catalog items for the router: metadata in memory, images read from storage on demand."""

from __future__ import annotations

import io
import json
import logging
import time
from collections import OrderedDict
from typing import Any

from visuray.storage import Artifact, ArtifactError, StorageOptions, resolve_artifact

log = logging.getLogger(__name__)


class CatalogItems:
    """Item metadata of a catalog in memory, and item images read on demand (a few shards cached).

    Metadata (ids, labels, titles...) is small and answers every search; image bytes are only needed
    for ``/v1/items/{id}/image``, so they stay in storage and are read shard by shard, checksum-verified.
    """

    META_COLUMNS = ["item_id", "label", "category", "title", "description", "attributes"]

    def __init__(self, catalog: Artifact, cache_shards: int = 4) -> None:
        import pyarrow.parquet as pq

        if catalog.manifest.kind != "catalog":
            raise ArtifactError(f"{catalog.uri} is a {catalog.manifest.kind!r} artifact, not a catalog")
        self.artifact = catalog
        self.version = catalog.manifest.version
        self._cache_shards = cache_shards
        self._images: OrderedDict[str, list[bytes]] = OrderedDict()
        self._rows: dict[str, dict[str, Any]] = {}
        self._where: dict[str, tuple[str, int]] = {}  # item_id -> (shard, row in shard)
        self._ids_in_order: list[str] | None = None
        for shard in sorted(n for n in catalog.manifest.files if n.endswith(".parquet")):
            table = pq.read_table(io.BytesIO(catalog.read(shard)), columns=self.META_COLUMNS)
            for row, record in enumerate(table.to_pylist()):
                record["attributes"] = json.loads(record["attributes"]) if record["attributes"] else {}
                self._rows[record["item_id"]] = record
                self._where[record["item_id"]] = (shard, row)

    @classmethod
    def load(cls, uri: str, options: StorageOptions | None = None, cache_shards: int = 4) -> CatalogItems:
        started = time.monotonic()
        items = cls(resolve_artifact(uri, options), cache_shards)
        log.info("loaded %d catalog items from %s in %.1fs", len(items), uri, time.monotonic() - started)
        return items

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._rows

    def get(self, item_id: str) -> dict[str, Any] | None:
        return self._rows.get(item_id)

    def image(self, item_id: str) -> bytes:
        """The encoded image of ``item_id`` as ingested; KeyError for an unknown id."""
        import pyarrow.parquet as pq

        shard, row = self._where[item_id]
        images = self._images.get(shard)
        if images is None:
            table = pq.read_table(io.BytesIO(self.artifact.read(shard)), columns=["image"])
            images = table.column("image").to_pylist()
            self._images[shard] = images
            while len(self._images) > self._cache_shards:
                self._images.popitem(last=False)
        self._images.move_to_end(shard)
        return images[row]

    def sample(self, limit: int, offset: int = 0) -> list[dict[str, Any]]:
        """Items in id order from ``offset``: what the web page shows to pick a query from."""
        ids = self._sorted_ids[offset : offset + limit]
        return [self._rows[i] for i in ids]

    @property
    def _sorted_ids(self) -> list[str]:
        if self._ids_in_order is None:
            self._ids_in_order = sorted(self._rows)
        return self._ids_in_order
