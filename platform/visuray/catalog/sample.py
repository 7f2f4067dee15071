"""The bundled sample data: a small, resized subset of clothing-small (CC0) shipped inside the package.

``sample_data/clothing_small/<class>/<file>.jpg`` is the demo catalog (train-split photos) and
``sample_data/clothing_small_queries/<class>/<file>.jpg`` holds held-out test-split photos to query it
with. Both are regenerated deterministically from the full dataset by::

    python -m visuray.catalog.sample --source ../shared/data/clothing-small

which takes, per class, the first ``--per-class`` decodable files of ``train/<class>/`` and the first
``--queries-per-class`` of ``test/<class>/`` in sorted file-name order (the names are UUIDs, so sorted
order is an unbiased but fixed sample), downscales them to ``--max-side`` pixels on the long side and
re-encodes them as JPEG at ``--quality``.
"""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Sequence
from pathlib import Path

SAMPLE_NAME = "clothing_small"
QUERY_NAME = "clothing_small_queries"

# 96 px keeps ~320 images at a few kB each (the whole sample ~1-2 MB) while tests and the demo train at
# 32-64 px; q=85 is the usual size/quality knee for small JPEGs.
DEFAULT_PER_CLASS = 30
DEFAULT_QUERIES_PER_CLASS = 2
DEFAULT_MAX_SIDE = 96
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
- How to regenerate (deterministic: same files, same order, same counts):

      python -m visuray.catalog.sample --source ../shared/data/clothing-small \\
          --per-class {per_class} --queries-per-class {queries} --max-side {max_side} --quality {quality}
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
    """Rebuild ``out/clothing_small``, ``out/clothing_small_queries``, ``LICENSE`` and ``PROVENANCE.md``."""
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
    parser.add_argument("--source", required=True, help="the full clothing-small folder (train/, test/)")
    parser.add_argument("--out", default=str(sample_data_root()), help="sample_data folder to rewrite")
    parser.add_argument("--per-class", type=int, default=DEFAULT_PER_CLASS, help="catalog images per class")
    parser.add_argument("--queries-per-class", type=int, default=DEFAULT_QUERIES_PER_CLASS)
    parser.add_argument("--max-side", type=int, default=DEFAULT_MAX_SIDE, help="long side in pixels")
    parser.add_argument("--quality", type=int, default=DEFAULT_QUALITY, help="JPEG quality")
    args = parser.parse_args(argv)
    counts = regenerate_sample(
        args.source, args.out, args.per_class, args.queries_per_class, args.max_side, args.quality
    )
    print(f"wrote {counts['catalog']} catalog and {counts['queries']} query images to {args.out}")


if __name__ == "__main__":
    main()
