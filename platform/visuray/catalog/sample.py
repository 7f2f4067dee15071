"""The bundled sample data: a small, resized subset of clothing-small (CC0) shipped inside the package.

``sample_data/clothing_small/<class>/<file>.jpg`` is the demo catalog (train-split photos) and
``sample_data/clothing_small_queries/<class>/<file>.jpg`` holds held-out test-split photos to query it
with. Both are regenerated deterministically from the full dataset by::

    python -m visuray.catalog.sample --source ../shared/data/clothing-small

which takes, per class, the first ``--per-class`` decodable files of ``train/<class>/`` and the first
``--queries-per-class`` of ``test/<class>/`` in sorted file-name order (the names are UUIDs, so sorted
order is an unbiased but fixed sample), downscales them to ``--max-side`` pixels on the long side and
re-encodes them as JPEG at ``--quality``.

Beside the images, ``sample_data/clothing_small.csv`` and ``sample_data/clothing_small_queries.csv`` hold
one row per image (``id``, ``image``, ``class``, ``colour``): ``colour`` is **estimated from the pixels**
of the bundled image (:func:`visuray.catalog.colours.estimate_colour`), not annotated, so that the demo
can form "same kind, in <colour>" composed queries. They are rewritten after the images, or on their own
from the bundled images (no source needed) by::

    python -m visuray.catalog.sample --metadata-only
"""

from __future__ import annotations

import argparse
import csv
import shutil
from collections.abc import Sequence
from pathlib import Path

SAMPLE_NAME = "clothing_small"
QUERY_NAME = "clothing_small_queries"
METADATA_COLUMNS = ("id", "image", "class", "colour")

# 160 px: the demo's pretrained EfficientNet-Lite0 runs at 160 px (at 96 px its features on these street
# photos lose ~0.1 of leave-one-out Recall@1: benchmarks/README.md); ~320 images stay ~4 MB. q=85 is the
# usual size/quality knee for small JPEGs.
DEFAULT_PER_CLASS = 30
DEFAULT_QUERIES_PER_CLASS = 2
DEFAULT_MAX_SIDE = 160
DEFAULT_QUALITY = 85

_PROVENANCE = """\
# Bundled sample data

`clothing_small/<class>/<file>.jpg` ({n_catalog} images) and `clothing_small_queries/<class>/<file>.jpg`
({n_queries} images) are a resized subset of **clothing-small**: real photos of clothes taken by people,
10 classes ({classes}).

- Source: github.com/alexeygrigorev/clothing-dataset-small (commit 1196151), as copied into
  `../shared/data/clothing-small` beside the project.
- Licence: CC0 1.0 Universal (public domain dedication); the full text is in `LICENSE` beside this file.
- What was done: per class, the first {per_class} decodable files of `train/<class>/` (the catalog) and
  the first {queries} of `test/<class>/` (held-out demo queries), in sorted file-name order; each image
  downscaled to at most {max_side} px on its long side (bicubic) and re-encoded as JPEG, quality
  {quality}. File names are kept, so every image can be traced back to the source.
- Metadata: `clothing_small.csv` and `clothing_small_queries.csv` have one row per image (`id`, `image`
  relative to its folder, `class`, `colour`). The `colour` is ESTIMATED FROM THE PIXELS of the bundled
  image (the dominant colour of the pixels that differ from the border, named from a palette of 11:
  `visuray.catalog.colours`), not annotated by people; shadows, patterns and coloured backgrounds mislead
  it. It gives the demo's composed queries ("same but in <colour>") something to ask for.
- How to regenerate (deterministic: same files, same order, same counts, same colours):

      python -m visuray.catalog.sample --source ../shared/data/clothing-small \\
          --per-class {per_class} --queries-per-class {queries} --max-side {max_side} --quality {quality}

  or only the metadata CSVs, from the bundled images: `python -m visuray.catalog.sample --metadata-only`.
"""


def sample_data_root() -> Path:
    """The ``sample_data`` folder inside the installed package."""
    return Path(__file__).resolve().parent.parent / "sample_data"


def bundled_path(name: str) -> Path:
    """The bundled sample folder called ``name`` (``clothing_small`` or ``clothing_small_queries``)."""
    path = sample_data_root() / name
    if not path.is_dir():
        known = sorted(p.name for p in sample_data_root().iterdir() if p.is_dir())
        raise FileNotFoundError(f"no bundled sample {name!r}; bundled: {', '.join(known) or 'none'}")
    return path


def bundled_sample_dir() -> Path:
    """The demo catalog: ``<class>/<file>.jpg``, train-split photos."""
    return bundled_path(SAMPLE_NAME)


def bundled_query_dir() -> Path:
    """Held-out demo queries: ``<class>/<file>.jpg``, test-split photos of the same classes."""
    return bundled_path(QUERY_NAME)


def metadata_csv_path(name: str, root: str | Path | None = None) -> Path:
    """The metadata CSV of the bundled folder ``name`` (``<root>/<name>.csv``, beside the folder)."""
    return Path(root or sample_data_root()) / f"{name}.csv"


def write_sample_metadata(root: str | Path | None = None) -> dict[str, int]:
    """(Re)write ``<name>.csv`` for both bundled folders: id, image, class, colour estimated from pixels.

    Rows are in sorted path order and ids are the image-folder ingest's (``<class>/<stem>``), so a CSV
    ingest of the sample gives the same items as a folder ingest, plus the ``class`` and ``colour``
    attributes. Returns the row count per folder.
    """
    from visuray.catalog.colours import estimate_colour

    root = Path(root or sample_data_root())
    counts = {}
    for name in (SAMPLE_NAME, QUERY_NAME):
        folder = root / name
        rows = []
        for path in sorted(folder.glob("*/*.jpg")):
            relative = path.relative_to(folder).as_posix()
            cls = path.parent.name
            rows.append((f"{cls}/{path.stem}", relative, cls, estimate_colour(path.read_bytes())))
        with metadata_csv_path(name, root).open("w", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(METADATA_COLUMNS)
            writer.writerows(rows)
        counts[name] = len(rows)
    return counts


def read_sample_metadata(name: str, root: str | Path | None = None) -> dict[str, dict[str, str]]:
    """The rows of a bundled metadata CSV keyed by item id (``<class>/<stem>``)."""
    with metadata_csv_path(name, root).open(newline="") as f:
        return {row["id"]: row for row in csv.DictReader(f)}


def _copy_resized(files: Sequence[Path], count: int, target: Path, max_side: int, quality: int) -> int:
    """Resize the first ``count`` decodable files into ``target`` (undecodable ones are passed over)."""
    from visuray.images import ImageDecodeError, decode_image, encode_jpeg, resize_max_side

    target.mkdir(parents=True, exist_ok=True)
    written = 0
    for path in files:
        if written >= count:
            break
        try:
            img = decode_image(path.read_bytes())
        except ImageDecodeError:
            continue
        out = target / (path.stem + ".jpg")
        out.write_bytes(encode_jpeg(resize_max_side(img, max_side), quality=quality))
        written += 1
    if written < count:
        raise ValueError(f"only {written} decodable images for {target.name}, {count} wanted")
    return written


def _image_files(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in (".jpg", ".jpeg", ".png")
    )


def regenerate_sample(
    source: str | Path,
    out: str | Path,
    per_class: int = DEFAULT_PER_CLASS,
    queries_per_class: int = DEFAULT_QUERIES_PER_CLASS,
    max_side: int = DEFAULT_MAX_SIDE,
    quality: int = DEFAULT_QUALITY,
) -> dict[str, int]:
    """Rebuild ``out/clothing_small``, ``out/clothing_small_queries``, their metadata CSVs, ``LICENSE`` and
    ``PROVENANCE.md``."""
    source, out = Path(source), Path(out)
    train, test = source / "train", source / "test"
    if not train.is_dir() or not test.is_dir():
        raise FileNotFoundError(f"{source} does not look like clothing-small (train/ and test/ expected)")
    classes = sorted(p.name for p in train.iterdir() if p.is_dir())
    for name in (SAMPLE_NAME, QUERY_NAME):
        shutil.rmtree(out / name, ignore_errors=True)
    counts = {"catalog": 0, "queries": 0}
    for cls in classes:
        catalog_dir, query_dir = out / SAMPLE_NAME / cls, out / QUERY_NAME / cls
        counts["catalog"] += _copy_resized(
            _image_files(train / cls), per_class, catalog_dir, max_side, quality
        )
        counts["queries"] += _copy_resized(
            _image_files(test / cls), queries_per_class, query_dir, max_side, quality
        )
    write_sample_metadata(out)
    shutil.copyfile(source / "LICENSE", out / "LICENSE")
    (out / "PROVENANCE.md").write_text(
        _PROVENANCE.format(
            n_catalog=counts["catalog"],
            n_queries=counts["queries"],
            classes=", ".join(classes),
            per_class=per_class,
            queries=queries_per_class,
            max_side=max_side,
            quality=quality,
        )
    )
    return counts


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m visuray.catalog.sample",
        description="Regenerate the bundled sample (a resized subset of clothing-small) deterministically.",
    )
    parser.add_argument("--source", help="the full clothing-small folder (train/, test/)")
    parser.add_argument(
        "--metadata-only",
        action="store_true",
        help="only rewrite the metadata CSVs (colours estimated from the bundled images); no --source needed",
    )
    parser.add_argument("--out", default=str(sample_data_root()), help="sample_data folder to rewrite")
    parser.add_argument("--per-class", type=int, default=DEFAULT_PER_CLASS, help="catalog images per class")
    parser.add_argument("--queries-per-class", type=int, default=DEFAULT_QUERIES_PER_CLASS)
    parser.add_argument("--max-side", type=int, default=DEFAULT_MAX_SIDE, help="long side in pixels")
    parser.add_argument("--quality", type=int, default=DEFAULT_QUALITY, help="JPEG quality")
    args = parser.parse_args(argv)
    if args.metadata_only:
        written = write_sample_metadata(args.out)
        print(", ".join(f"{n} rows in {metadata_csv_path(k, args.out)}" for k, n in written.items()))
        return
    if not args.source:
        parser.error("--source is required (or --metadata-only)")
    counts = regenerate_sample(
        args.source, args.out, args.per_class, args.queries_per_class, args.max_side, args.quality
    )
    print(f"wrote {counts['catalog']} catalog and {counts['queries']} query images to {args.out}")


if __name__ == "__main__":
    main()
