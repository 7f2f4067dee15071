"""The ingest job: image folders and images + CSV into a catalog; bad files reported, never fatal."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visuray.catalog.ingest import MAX_REPORTED_SKIPS, IngestConfig, IngestError, run_ingest
from visuray.catalog.sample import DEFAULT_MAX_SIDE, bundled_query_dir, bundled_sample_dir, regenerate_sample
from visuray.catalog.schema import iter_rows
from visuray.config import ConfigError, validate_config
from visuray.images import decode_image, encode_jpeg
from visuray.jobspec import load_job_spec
from visuray.storage import LATEST_NAME, MANIFEST_NAME, resolve_artifact

pytestmark = pytest.mark.unit

REPO_ROOT = Path(__file__).resolve().parent.parent
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (20, 40, 230)}


def jpeg(colour: tuple[int, int, int], size: tuple[int, int] = (24, 16), seed: int = 0) -> bytes:
    """A small real JPEG: a flat colour plus a little noise, so files of one class differ."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour) + rng.integers(-10, 10, (size[1], size[0], 3)), 0, 255)
    return encode_jpeg(Image.fromarray(pixels.astype(np.uint8)))


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def make_class_folder(root: Path, per_class: int = 3) -> dict[str, Path]:
    """``<colour>/<i>.jpg`` for three colours, plus three corrupt images and two non-image files.

    Returns the corrupt files by kind.
    """
    for c, (name, colour) in enumerate(COLOURS.items()):
        for i in range(per_class):
            write(root / name / f"img{i}.jpg", jpeg(colour, seed=10 * c + i))
    good = jpeg((1, 2, 3), size=(64, 64))
    corrupt = {
        "random": write(root / "red" / "zz-random.jpg", np.random.default_rng(5).bytes(2000)),
        "truncated": write(root / "green" / "zz-truncated.jpg", good[: len(good) // 2]),
        "empty": write(root / "blue" / "zz-empty.png", b""),
    }
    write(root / "LICENSE", b"not an image, ignored")
    write(root / "red" / ".DS_Store", b"\x00\x01")
    return corrupt


def catalog_rows(uri: str | Path) -> list[dict]:
    return list(iter_rows(resolve_artifact(str(uri))))


def published_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name in (LATEST_NAME, MANIFEST_NAME)]


def test_image_folder_skips_and_reports_corrupt_files(tmp_path: Path) -> None:
    corrupt = make_class_folder(tmp_path / "src")
    out = tmp_path / "catalog"
    summary = run_ingest(IngestConfig(source=str(tmp_path / "src"), output=str(out), shard_rows=4))

    assert summary["num_ok"] == summary["num_items"] == 9
    assert summary["num_skipped"] == 3 and summary["num_ignored"] == 1  # LICENSE; .DS_Store is hidden
    reasons = {Path(s["path"]): s["reason"] for s in summary["skipped"]}
    assert set(reasons) == set(corrupt.values())
    assert "empty" in reasons[corrupt["empty"]]
    assert "truncated" in reasons[corrupt["truncated"]] or "corrupt" in reasons[corrupt["truncated"]]
    assert "not a decodable image" in reasons[corrupt["random"]]

    artifact = resolve_artifact(str(out))
    assert artifact.manifest.version == summary["version"]
    assert artifact.manifest.metadata["ingest"]["skipped"] == summary["skipped"]
    assert artifact.manifest.metadata["num_shards"] == summary["num_shards"] == 3  # 9 rows, 4 per shard
    assert artifact.manifest.metadata["labels"] == sorted(COLOURS)

    rows = catalog_rows(out)
    # Sorted walk: deterministic order, ids are paths below the source without extension.
    assert [r["item_id"] for r in rows] == [f"{c}/img{i}" for c in sorted(COLOURS) for i in range(3)]
    for row in rows:
        cls = row["item_id"].split("/")[0]
        assert row["label"] == row["category"] == cls
        assert row["source"] == str(tmp_path / "src" / f"{row['item_id']}.jpg")
        assert row["image"] == (tmp_path / "src" / f"{row['item_id']}.jpg").read_bytes()  # bytes as ingested
        assert json.loads(row["attributes"]) == {}


def test_all_corrupt_source_is_an_error_and_publishes_nothing(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write(src / "a" / "x.jpg", b"garbage")
    write(src / "a" / "y.jpg", b"")
    out = tmp_path / "catalog"
    with pytest.raises(IngestError, match=r"no usable image among 2 candidate\(s\).*nothing was published"):
        run_ingest(IngestConfig(source=str(src), output=str(out)))
    assert published_files(tmp_path) == []
    assert not list(out.rglob("*.parquet"))


def test_empty_or_missing_source_is_an_error(tmp_path: Path) -> None:
    write(tmp_path / "src" / "README.md", b"no images here")
    with pytest.raises(IngestError, match="no image files found"):
        run_ingest(IngestConfig(source=str(tmp_path / "src"), output=str(tmp_path / "out")))
    with pytest.raises(IngestError, match="does not exist"):
        run_ingest(IngestConfig(source=str(tmp_path / "missing"), output=str(tmp_path / "out")))
    assert published_files(tmp_path) == []


def test_flat_folder_has_no_labels(tmp_path: Path) -> None:
    for i in range(2):
        write(tmp_path / "src" / f"p{i}.jpg", jpeg((100, 100, 100), seed=i))
    run_ingest(IngestConfig(source=str(tmp_path / "src"), output=str(tmp_path / "out")))
    rows = catalog_rows(tmp_path / "out")
    assert [(r["item_id"], r["label"], r["category"]) for r in rows] == [
        ("p0", None, None),
        ("p1", None, None),
    ]


def test_split_folders(tmp_path: Path) -> None:
    src = tmp_path / "src"
    for split in ("test", "train"):
        for cls in ("hat", "shoes"):
            write(src / split / cls / "a.jpg", jpeg((9, 9, 9)))
    write(src / "train" / "stray.jpg", jpeg((9, 9, 9)))  # not <split>/<class>/<file>

    summary = run_ingest(IngestConfig(source=str(src), output=str(tmp_path / "all"), split_from_folders=True))
    rows = catalog_rows(tmp_path / "all")
    assert [(r["item_id"], r["label"], json.loads(r["attributes"])) for r in rows] == [
        ("test/hat/a", "hat", {"split": "test"}),
        ("test/shoes/a", "shoes", {"split": "test"}),
        ("train/hat/a", "hat", {"split": "train"}),
        ("train/shoes/a", "shoes", {"split": "train"}),
    ]
    assert summary["skipped"] == [
        {"path": str(src / "train" / "stray.jpg"), "reason": "not laid out as <split>/<class>/<file>"}
    ]

    cfg = IngestConfig(
        source=str(src), output=str(tmp_path / "train"), split_from_folders=True, splits=["train"]
    )
    run_ingest(cfg)
    assert [r["item_id"] for r in catalog_rows(tmp_path / "train")] == ["train/hat/a", "train/shoes/a"]


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(rows)
    return write(path, buf.getvalue().encode())


def test_csv_mode_round_trips_every_column_and_skips_bad_rows(tmp_path: Path) -> None:
    src = tmp_path / "shop"
    write(src / "img" / "a.jpg", jpeg((200, 0, 0)))
    png = _png((0, 0, 200))
    write(src / "img" / "b.png", png)
    header = ["sku", "file", "kind", "dept", "name", "text", "colour", "size", "unused"]
    write_csv(
        src / "meta.csv",
        header,
        [
            ["A1", "img/a.jpg", "dress", "women", "Red dress", "A red, long dress", "red", "M", "x"],
            ["B2", "img/b.png", "shirt", "men", "Blue shirt", "", "blue", "", "y"],
            ["C3", "img/missing.jpg", "shirt", "men", "Gone", "", "", "", ""],
            ["A1", "img/b.png", "dress", "women", "Duplicate", "", "", "", ""],
            ["", "img/a.jpg", "dress", "women", "No id", "", "", "", ""],
        ],
    )
    cfg = IngestConfig(
        source=str(src),
        metadata_csv=str(src / "meta.csv"),
        output=str(tmp_path / "out"),
        id_column="sku",
        image_column="file",
        label_column="kind",
        category_column="dept",
        title_column="name",
        description_column="text",
        attribute_columns=["colour", "size"],
    )
    summary = run_ingest(cfg)
    assert summary["num_ok"] == 2 and summary["num_skipped"] == 3
    reasons = [s["reason"] for s in summary["skipped"]]
    assert reasons[0] == "empty 'sku' or 'file' cell"  # rows are listed first, images read after
    assert summary["skipped"][0]["path"] == f"{src / 'meta.csv'}:6"
    assert {"path": str(src / "img" / "missing.jpg"), "reason": "file not found"} in summary["skipped"]
    assert "duplicate item id 'A1'" in reasons[2]

    rows = catalog_rows(tmp_path / "out")
    assert rows == [
        {
            "item_id": "A1",
            "image": (src / "img" / "a.jpg").read_bytes(),
            "label": "dress",
            "category": "women",
            "title": "Red dress",
            "description": "A red, long dress",
            "attributes": json.dumps({"colour": "red", "size": "M"}, sort_keys=True),
            "source": str(src / "img" / "a.jpg"),
        },
        {
            "item_id": "B2",
            "image": png,
            "label": "shirt",
            "category": "men",
            "title": "Blue shirt",
            "description": None,  # empty cells are missing values
            "attributes": json.dumps({"colour": "blue"}),
            "source": str(src / "img" / "b.png"),
        },
    ]


def _png(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (10, 10), colour).save(buf, format="PNG")
    return buf.getvalue()


FASHION_HEADER = [
    "id",
    "gender",
    "masterCategory",
    "subCategory",
    "articleType",
    "baseColour",
    "season",
    "year",
    "usage",
    "productDisplayName",
    "image",
]


def test_csv_defaults_fit_the_fashion_products_layout(tmp_path: Path) -> None:
    src = tmp_path / "fashion"
    write(src / "images" / "10000.jpg", jpeg((255, 255, 255)))
    row = ["10000", "Women", "Apparel", "Bottomwear", "Skirts", "White", "Summer", "2011", "Casual"]
    write_csv(src / "metadata.csv", FASHION_HEADER, [[*row, "Palm Tree White Skirt", "images/10000.jpg"]])
    run_ingest(
        IngestConfig(source=str(src), metadata_csv=str(src / "metadata.csv"), output=str(tmp_path / "o"))
    )
    (record,) = catalog_rows(tmp_path / "o")
    assert (record["item_id"], record["label"], record["category"]) == ("10000", "Skirts", "Bottomwear")
    assert record["title"] == "Palm Tree White Skirt" and record["description"] is None
    assert json.loads(record["attributes"]) == dict(zip(FASHION_HEADER[1:9], row[1:], strict=True))


def test_csv_missing_column_is_named(tmp_path: Path) -> None:
    write_csv(tmp_path / "m.csv", ["id", "image"], [["1", "a.jpg"]])
    cfg = IngestConfig(source=str(tmp_path), metadata_csv=str(tmp_path / "m.csv"), output=str(tmp_path / "o"))
    with pytest.raises(IngestError, match="label_column='articleType'.*it has: id, image"):
        run_ingest(cfg)
    assert published_files(tmp_path) == []


def test_resize_reencodes_only_large_images(tmp_path: Path) -> None:
    src = tmp_path / "src"
    big = write(src / "c" / "big.jpg", jpeg((50, 60, 70), size=(200, 100)))
    small = write(src / "c" / "small.jpg", jpeg((50, 60, 70), size=(40, 20)))
    summary = run_ingest(IngestConfig(source=str(src), output=str(tmp_path / "o"), resize_max_side=64))
    assert summary["num_resized"] == 1
    by_id = {r["item_id"]: r["image"] for r in catalog_rows(tmp_path / "o")}
    assert decode_image(by_id["c/big"]).size == (64, 32)
    assert by_id["c/small"] == small.read_bytes() != big.read_bytes()


def test_limit_takes_the_first_items_in_order(tmp_path: Path) -> None:
    make_class_folder(tmp_path / "src")
    summary = run_ingest(IngestConfig(source=str(tmp_path / "src"), output=str(tmp_path / "o"), limit=4))
    assert summary["num_items"] == 4
    assert [r["item_id"] for r in catalog_rows(tmp_path / "o")] == [
        "blue/img0",
        "blue/img1",
        "blue/img2",
        "green/img0",
    ]


def test_skipped_list_is_capped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("visuray.catalog.ingest.MAX_REPORTED_SKIPS", 2)
    src = tmp_path / "src"
    write(src / "ok.jpg", jpeg((1, 1, 1)))
    for i in range(5):
        write(src / f"bad{i}.jpg", b"nope")
    summary = run_ingest(IngestConfig(source=str(src), output=str(tmp_path / "o")))
    assert summary["num_skipped"] == 5 and len(summary["skipped"]) == 2 and summary["skipped_truncated"]
    assert MAX_REPORTED_SKIPS == 1000


def test_second_ingest_publishes_a_new_version(tmp_path: Path) -> None:
    make_class_folder(tmp_path / "src")
    out = str(tmp_path / "o")
    first = run_ingest(IngestConfig(source=str(tmp_path / "src"), output=out))
    second = run_ingest(IngestConfig(source=str(tmp_path / "src"), output=out))
    assert first["version"] != second["version"]
    assert resolve_artifact(out).manifest.version == second["version"]
    assert catalog_rows(first["version_uri"]) == catalog_rows(second["version_uri"])  # deterministic


def test_config_rejects_unknown_keys() -> None:
    with pytest.raises(ConfigError, match="label_colum: unknown key"):
        validate_config(IngestConfig, {"source": "x", "output": "y", "label_colum": "a"})


@pytest.mark.parametrize(
    "spec", sorted((REPO_ROOT / "jobs" / "configs").glob("ingest_*.yaml")), ids=lambda p: p.name
)
def test_shipped_ingest_specs_validate(spec: Path) -> None:
    kind, cfg = load_job_spec(spec)
    assert kind.name == "ingest" and isinstance(cfg, IngestConfig)


def test_bundled_sample_ingests(tmp_path: Path) -> None:
    summary = run_ingest(IngestConfig(source="bundled:clothing_small", output=str(tmp_path / "o")))
    assert summary["num_ok"] == 300 and summary["num_skipped"] == 0 and summary["num_labels"] == 10
    assert summary["source"] == str(bundled_sample_dir())
    labels = resolve_artifact(str(tmp_path / "o")).manifest.metadata["labels"]
    queries = sorted(bundled_query_dir().rglob("*.jpg"))
    assert len(queries) == 20 and {q.parent.name for q in queries} == set(labels)
    catalog_names = {p.name for p in bundled_sample_dir().rglob("*.jpg")}
    assert not catalog_names & {q.name for q in queries}  # queries are held out
    assert all(max(decode_image(q.read_bytes()).size) <= DEFAULT_MAX_SIDE for q in queries)
    sample_root = bundled_sample_dir().parent
    assert "CC0" in (sample_root / "LICENSE").read_text()
    assert "python -m visuray.catalog.sample" in (sample_root / "PROVENANCE.md").read_text()


def test_sample_regeneration_is_deterministic(tmp_path: Path) -> None:
    src = tmp_path / "clothing"
    for split, n in (("train", 4), ("test", 3)):
        for c, cls in enumerate(("hat", "pants")):
            for i in range(n):
                write(src / split / cls / f"{i:02d}.jpg", jpeg((c * 100, 50, 50), size=(160, 120), seed=i))
    write(src / "train" / "hat" / "00a-broken.jpg", b"broken")  # passed over, not counted
    shutil.copyfile(bundled_sample_dir().parent / "LICENSE", src / "LICENSE")

    def snapshot(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    counts = regenerate_sample(src, tmp_path / "a", per_class=2, queries_per_class=1, max_side=48)
    assert counts == {"catalog": 4, "queries": 2}
    first = snapshot(tmp_path / "a")
    assert sorted(k for k in first if k.endswith(".jpg")) == [
        "clothing_small/hat/00.jpg",
        "clothing_small/hat/01.jpg",
        "clothing_small/pants/00.jpg",
        "clothing_small/pants/01.jpg",
        "clothing_small_queries/hat/00.jpg",
        "clothing_small_queries/pants/00.jpg",
    ]
    assert decode_image(first["clothing_small/hat/00.jpg"]).size == (48, 36)
    regenerate_sample(src, tmp_path / "a", per_class=2, queries_per_class=1, max_side=48)
    assert snapshot(tmp_path / "a") == first
