"""Reading a published catalog: as a Ray Dataset, as a torch Dataset, or as a pandas frame of its text.

All three resolve the catalog through its manifest (``LATEST`` -> version -> ``MANIFEST.json``), so they
only ever read complete, published versions. The in-process readers check every shard's SHA-256; Ray
Data reads shards in its workers, so :func:`read_catalog_dataset` checks each shard's size against the
manifest up front (a cheap listing, no download) and leaves streaming reads to Ray.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from visuray.catalog.schema import CATALOG_SCHEMA
from visuray.images import decode_image
from visuray.storage import Artifact, ArtifactError, StorageOptions, get_filesystem, resolve_artifact

if TYPE_CHECKING:
    import pandas as pd
    import ray.data
    from PIL import Image

# Rows without a label (an unlabelled image folder) get this label index; samplers must leave them out.
NO_LABEL = -1


def _catalog(uri: str | Artifact, options: StorageOptions | None) -> Artifact:
    artifact = uri if isinstance(uri, Artifact) else resolve_artifact(uri, options)
    if artifact.manifest.kind != "catalog":
        raise ArtifactError(f"{artifact.uri} holds a {artifact.manifest.kind!r} artifact, not a catalog")
    return artifact


def _shard_names(artifact: Artifact) -> list[str]:
    names = sorted(n for n in artifact.manifest.files if n.endswith(".parquet"))
    if not names:
        raise ArtifactError(f"catalog {artifact.uri} lists no Parquet shards")
    return names


def _check_columns(columns: Sequence[str] | None) -> list[str] | None:
    if columns is None:
        return None
    unknown = [c for c in columns if c not in CATALOG_SCHEMA.names]
    if unknown:
        raise ValueError(f"unknown catalog column(s) {unknown}; the catalog has {CATALOG_SCHEMA.names}")
    return list(columns)


def _read_shard(artifact: Artifact, name: str, columns: list[str] | None) -> pa.Table:
    return pq.read_table(io.BytesIO(artifact.read(name)), columns=columns)  # read() verifies the checksum


def read_shard_tables(
    uri: str | Artifact, options: StorageOptions | None = None, columns: Sequence[str] | None = None
) -> list[pa.Table]:
    """Every shard of a catalog as an Arrow table, in shard order, each checked against its checksum."""
    artifact = _catalog(uri, options)
    cols = _check_columns(columns)
    return [_read_shard(artifact, name, cols) for name in _shard_names(artifact)]


def sample_catalog_images(
    uri: str | Artifact, count: int, options: StorageOptions | None = None, seed: int = 0
) -> list[bytes]:
    """Up to ``count`` encoded images of a catalog, a seeded random sample read one shard at a time.

    Shards are visited in a seeded random order; each gives a random share of what is still missing
    (what remains divided by the shards left, rounded up), so the sample spreads over the catalog while
    at most one shard's images are in memory beside it. Fewer than ``count`` only when the catalog is
    smaller.
    """
    import random

    artifact = _catalog(uri, options)
    names = _shard_names(artifact)
    rng = random.Random(seed)
    rng.shuffle(names)
    images: list[bytes] = []
    for left, name in zip(range(len(names), 0, -1), names, strict=True):
        wanted = -(-(count - len(images)) // left)
        if wanted <= 0:
            break
        column = _read_shard(artifact, name, ["image"])["image"]
        rows = rng.sample(range(len(column)), min(wanted, len(column)))
        images.extend(column[i].as_py() for i in sorted(rows))
    return images


def read_catalog_dataset(
    uri: str | Artifact, options: StorageOptions | None = None, columns: Sequence[str] | None = None
) -> ray.data.Dataset:
    """The catalog's published shards as a Ray Dataset (``image`` stays encoded bytes, ``attributes`` JSON).

    ``s3://`` catalogs are read through an s3fs filesystem built from ``options`` and wrapped for Arrow,
    so the endpoint and credentials in ``options`` travel to the Ray workers with the read tasks.
    """
    import ray.data
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    artifact = _catalog(uri, options)
    fs, _ = get_filesystem(artifact.uri, options)
    paths = []
    for name in _shard_names(artifact):
        _, path = get_filesystem(artifact.file_uri(name), options)
        try:
            size = fs.size(path)
        except FileNotFoundError:
            raise ArtifactError(f"{name} listed in the manifest of {artifact.uri} is missing") from None
        if size != artifact.manifest.files[name]["size"]:
            raise ArtifactError(
                f"{name} in {artifact.uri} is {size} bytes, the manifest says "
                f"{artifact.manifest.files[name]['size']}: the file is corrupt"
            )
        paths.append(path)
    arrow_fs = PyFileSystem(FSSpecHandler(fs))
    # Version folders are not hive partitions: no path segment should turn into a column.
    return ray.data.read_parquet(
        paths, filesystem=arrow_fs, columns=_check_columns(columns), partitioning=None
    )


def load_catalog_frame(
    uri: str | Artifact, options: StorageOptions | None = None, columns: Sequence[str] | None = None
) -> pd.DataFrame:
    """The catalog's rows without image bytes (unless ``columns`` asks for them), for evaluation and reports.

    ``attributes`` is decoded from JSON into one dict per row.
    """
    if columns is None:
        columns = [c for c in CATALOG_SCHEMA.names if c != "image"]
    tables = read_shard_tables(uri, options, columns)
    frame = pa.concat_tables(tables).to_pandas()
    if "attributes" in frame.columns:
        frame["attributes"] = [json.loads(a) if a else {} for a in frame["attributes"]]
    return frame


def _index_of(values: list[str | None], vocabulary: list[str]) -> list[int]:
    position = {name: i for i, name in enumerate(vocabulary)}
    return [NO_LABEL if v is None else position[v] for v in values]


class CatalogRows:
    """A whole catalog in process memory (checksums verified on load); the torch-free core of
    :class:`visuray.catalog.torch_dataset.CatalogTorchDataset`, which is what training loops and samplers use.

    Image bytes stay encoded and are decoded in :meth:`__getitem__`, so a catalog of ~10k small photos
    costs tens of MB. ``labels`` and ``categories`` are one int per row (indices into ``label_names`` and
    ``category_names``, :data:`NO_LABEL` where missing) for class- and category-balanced samplers.

    Items are dicts (``index``, ``item_id``, ``image``, ``label``, ``label_name``, ``category``,
    ``category_name``, ``title``, ``description``, ``attributes``) or, with ``as_tuple=True``,
    ``(image, label)``. ``image`` is ``transform(pil_image)`` when a transform is given, else the RGB
    PIL image.
    """

    def __init__(
        self,
        uri: str | Artifact,
        options: StorageOptions | None = None,
        transform: Callable[[Image.Image], Any] | None = None,
        as_tuple: bool = False,
    ) -> None:
        artifact = _catalog(uri, options)
        self.uri = artifact.uri
        self.version = artifact.manifest.version
        self.transform = transform
        self.as_tuple = as_tuple
        table = pa.concat_tables(read_shard_tables(artifact))
        self.item_ids: list[str] = table["item_id"].to_pylist()
        self._images: list[bytes] = table["image"].to_pylist()
        self.label_names: list[str] = list(artifact.manifest.metadata.get("labels", []))
        self.category_names: list[str] = list(artifact.manifest.metadata.get("categories", []))
        self.labels: list[int] = _index_of(table["label"].to_pylist(), self.label_names)
        self.categories: list[int] = _index_of(table["category"].to_pylist(), self.category_names)
        self.titles: list[str | None] = table["title"].to_pylist()
        self.descriptions: list[str | None] = table["description"].to_pylist()
        self.attributes: list[dict[str, Any]] = [
            json.loads(a) if a else {} for a in table["attributes"].to_pylist()
        ]
        self.sources: list[str | None] = table["source"].to_pylist()

    def __len__(self) -> int:
        return len(self.item_ids)

    def image_bytes(self, index: int) -> bytes:
        """Row ``index``'s image as stored (encoded JPEG/PNG)."""
        return self._images[index]

    def image(self, index: int) -> Image.Image:
        """The decoded RGB image of row ``index``, before any transform."""
        return decode_image(self._images[index])

    def __getitem__(self, index: int) -> dict[str, Any] | tuple[Any, int]:
        img = self.image(index)
        image = self.transform(img) if self.transform is not None else img
        label = self.labels[index]
        if self.as_tuple:
            return image, label
        category = self.categories[index]
        return {
            "index": index,
            "item_id": self.item_ids[index],
            "image": image,
            "label": label,
            "label_name": self.label_names[label] if label != NO_LABEL else None,
            "category": category,
            "category_name": self.category_names[category] if category != NO_LABEL else None,
            "title": self.titles[index],
            "description": self.descriptions[index],
            "attributes": self.attributes[index],
        }
