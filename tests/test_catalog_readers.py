"""Catalog readers: in-process torch Dataset and pandas frame (checksums), Ray Data (local and S3)."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from visuray.catalog.ingest import IngestConfig, run_ingest
from visuray.catalog.readers import NO_LABEL, CatalogRows, load_catalog_frame, read_catalog_dataset
from visuray.catalog.schema import CatalogRecord, write_catalog
from visuray.catalog.torch_dataset import CatalogTorchDataset
from visuray.images import encode_jpeg
from visuray.storage import ArtifactError, StorageOptions, resolve_artifact

COLOURS = [(250, 0, 0), (0, 250, 0), (0, 0, 250)]


def make_records(n: int = 7) -> list[CatalogRecord]:
    """Rows with every column set; the colour of each image encodes its row number (mod 3)."""
    records = []
    for i in range(n):
        img = Image.new("RGB", (20 + i, 12), COLOURS[i % 3])
        records.append(
            CatalogRecord(
                item_id=f"item-{i:02d}",
                image=encode_jpeg(img, quality=95),
                label=["shoe", "hat", "bag"][i % 3] if i != n - 1 else None,
                category="accessories" if i % 3 else "footwear",
                title=f"title {i}",
                description=f"description {i}" if i % 2 else None,
                attributes={"colour": ["red", "green", "blue"][i % 3], "i": i},
                source=f"/src/{i}.jpg",
            )
        )
    return records


@pytest.fixture()
def catalog(tmp_path: Path) -> str:
    uri = str(tmp_path / "catalog")
    write_catalog(make_records(), uri, shard_rows=3)
    return uri


def corrupt_first_shard(uri: str, truncate: bool) -> None:
    artifact = resolve_artifact(uri)
    shard = Path(artifact.uri) / "part-00000.parquet"
    data = bytearray(shard.read_bytes())
    if truncate:
        del data[-10:]
    else:
        data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))


@pytest.mark.unit
def test_torch_dataset_rows_labels_and_lazy_decoding(catalog: str) -> None:
    ds = CatalogTorchDataset(catalog)
    assert isinstance(ds, torch.utils.data.Dataset) and isinstance(ds, CatalogRows)
    records = make_records()
    assert len(ds) == len(records) and ds.item_ids == [r.item_id for r in records]
    assert ds.label_names == ["bag", "hat", "shoe"] and ds.category_names == ["accessories", "footwear"]
    expected_labels = [ds.label_names.index(r.label) if r.label else NO_LABEL for r in records]
    assert ds.labels == expected_labels and ds.labels[-1] == NO_LABEL
    assert ds.categories == [ds.category_names.index(r.category) for r in records]
    assert all(isinstance(b, bytes) for b in ds._images)  # kept encoded until __getitem__

    for i, record in enumerate(records):
        item = ds[i]
        assert item["item_id"] == record.item_id and item["index"] == i
        assert item["label_name"] == record.label and item["category_name"] == record.category
        assert (item["title"], item["description"]) == (record.title, record.description)
        assert item["attributes"] == record.attributes
        assert item["image"].mode == "RGB" and item["image"].size == (20 + i, 12)
        mean_colour = np.asarray(item["image"], dtype=float).mean(axis=(0, 1))
        np.testing.assert_allclose(mean_colour, COLOURS[i % 3], atol=6)  # JPEG q=95 of a flat colour


def to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img.resize((8, 8)), dtype=np.float32)).permute(2, 0, 1) / 255


@pytest.mark.unit
def test_torch_dataset_tuples_with_transform_through_a_dataloader(catalog: str) -> None:
    ds = CatalogTorchDataset(catalog, transform=to_tensor, as_tuple=True)
    image, label = ds[1]
    assert image.shape == (3, 8, 8) and label == ds.label_names.index("hat")
    assert image[1].mean() > 0.9 and image[0].mean() < 0.1  # row 1 is green

    loader = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=False)
    images, labels = next(iter(loader))
    assert images.shape == (4, 3, 8, 8) and labels.tolist() == ds.labels[:4]

    clone = pickle.loads(pickle.dumps(ds))  # DataLoader workers and Ray ship datasets by pickle
    assert type(clone) is CatalogTorchDataset and clone.item_ids == ds.item_ids


@pytest.mark.unit
def test_frame_has_text_columns_without_images(catalog: str) -> None:
    frame = load_catalog_frame(catalog)
    assert list(frame.columns) == [
        "item_id",
        "label",
        "category",
        "title",
        "description",
        "attributes",
        "source",
    ]
    records = make_records()
    assert frame["item_id"].tolist() == [r.item_id for r in records]
    assert frame["attributes"].tolist() == [r.attributes for r in records]
    assert frame["label"].tolist()[:3] == ["shoe", "hat", "bag"] and frame["label"].isna().tolist()[-1]

    narrow = load_catalog_frame(catalog, columns=["item_id", "image"])
    assert list(narrow.columns) == ["item_id", "image"] and narrow["image"][0] == records[0].image
    with pytest.raises(ValueError, match="unknown catalog column"):
        load_catalog_frame(catalog, columns=["price"])


@pytest.mark.unit
def test_corrupt_shard_is_detected(catalog: str) -> None:
    corrupt_first_shard(catalog, truncate=False)
    with pytest.raises(ArtifactError, match="checksum mismatch for part-00000.parquet"):
        CatalogTorchDataset(catalog)
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        load_catalog_frame(catalog)


@pytest.mark.unit
def test_ray_reader_checks_shard_sizes_before_reading(catalog: str) -> None:
    corrupt_first_shard(catalog, truncate=True)
    with pytest.raises(ArtifactError, match="part-00000.parquet .* the manifest says"):
        read_catalog_dataset(catalog)


@pytest.mark.unit
def test_unpublished_catalog_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="no published artifact"):
        CatalogTorchDataset(str(tmp_path / "nothing"))


def assert_dataset_matches(ds: object, records: list[CatalogRecord]) -> None:
    rows = sorted(ds.take_all(), key=lambda r: r["item_id"])  # type: ignore[attr-defined]
    assert [r["item_id"] for r in rows] == [r.item_id for r in records]
    for row, record in zip(rows, records, strict=True):
        assert row["image"] == record.image and row["label"] == record.label
        assert json.loads(row["attributes"]) == record.attributes


@pytest.mark.ray
def test_ray_dataset_reads_published_shards(ray_cluster: object, catalog: str) -> None:
    ds = read_catalog_dataset(catalog)
    assert ds.count() == 7
    assert_dataset_matches(ds, make_records())
    narrow = read_catalog_dataset(catalog, columns=["item_id", "label"])
    assert set(narrow.schema().names) == {"item_id", "label"}  # no path segment turned into a column


@pytest.mark.s3
@pytest.mark.ray
def test_ingest_to_s3_and_read_back_with_both_readers(
    ray_cluster: object, s3_server: dict[str, str], s3_bucket: str, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    item_ids = []
    for i, record in enumerate(make_records(5)):
        item_ids.append(f"{record.label or 'unlabelled'}/{i}")
        path = src / f"{item_ids[-1]}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(record.image)
    (src / "hat" / "broken.jpg").write_bytes(b"broken")
    # Explicit credentials: Ray workers do not inherit the test process's AWS_* environment.
    options = StorageOptions(endpoint_url=s3_server["endpoint_url"], key="testing", secret="testing")
    uri = f"{s3_bucket}/catalogs/demo"
    summary = run_ingest(IngestConfig(source=str(src), output=uri, storage=options, shard_rows=2))
    assert summary["num_ok"] == 5 and summary["num_skipped"] == 1 and summary["num_shards"] == 3
    assert summary["version_uri"].startswith(f"{s3_bucket}/catalogs/demo/versions/")

    torch_ds = CatalogTorchDataset(uri, options)
    assert torch_ds.item_ids == sorted(item_ids)
    first = torch_ds[0]
    assert first["image"].size == Image.open(src / f"{first['item_id']}.jpg").size

    rows = read_catalog_dataset(uri, options, columns=["item_id", "image", "label"]).take_all()
    assert sorted(r["item_id"] for r in rows) == sorted(item_ids)
    for row in rows:
        assert row["image"] == (src / f"{row['item_id']}.jpg").read_bytes()
        assert row["label"] == row["item_id"].split("/")[0]
