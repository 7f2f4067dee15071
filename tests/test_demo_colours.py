"""The colour estimate behind the demo's composed queries, and the bundled sample's metadata CSVs."""

from __future__ import annotations

import csv
import io

import numpy as np
import pytest
from PIL import Image

from visuray.catalog.colours import PALETTE, colour_votes, estimate_colour, name_rgb
from visuray.catalog.sample import (
    QUERY_NAME,
    SAMPLE_NAME,
    bundled_path,
    metadata_csv_path,
    read_sample_metadata,
    write_sample_metadata,
)
from visuray.demo import pick_target_colours, scaled_steps

pytestmark = [pytest.mark.unit]


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buf, format="PNG")  # lossless: exact colours
    return buf.getvalue()


def _garment(background: tuple[int, int, int], garment: tuple[int, int, int], side: int = 96) -> bytes:
    """A photo-like test image: a centred block of one colour on a plain background."""
    img = np.zeros((side, side, 3), dtype=np.uint8)
    img[:] = background
    img[side // 5 : -side // 5, side // 4 : -side // 4] = garment
    return _png(img)


@pytest.mark.parametrize(
    ("rgb", "name"),
    [
        ((0.05, 0.05, 0.05), "black"),
        ((0.95, 0.95, 0.95), "white"),
        ((0.5, 0.5, 0.5), "grey"),
        ((0.8, 0.1, 0.1), "red"),
        ((1.0, 0.55, 0.0), "orange"),
        ((0.95, 0.9, 0.1), "yellow"),
        ((0.1, 0.6, 0.2), "green"),
        ((0.1, 0.2, 0.8), "blue"),
        ((0.5, 0.1, 0.7), "purple"),
        ((0.95, 0.6, 0.7), "pink"),
        ((0.45, 0.3, 0.15), "brown"),
    ],
)
def test_palette_names(rgb, name):
    assert name in PALETTE
    assert name_rgb(rgb) == name


@pytest.mark.parametrize(
    ("background", "garment", "name"),
    [
        ((235, 235, 235), (200, 20, 20), "red"),  # red dress on a white wall
        ((120, 120, 120), (20, 40, 200), "blue"),  # blue shirt on a grey floor
        ((200, 160, 120), (15, 15, 15), "black"),  # black trousers on a wooden floor
        ((30, 30, 30), (240, 240, 240), "white"),  # white t-shirt on a dark bed
    ],
)
def test_estimate_ignores_the_background(background, garment, name):
    assert estimate_colour(_garment(background, garment)) == name


def test_uniform_image_falls_back_to_the_centre():
    # No pixel differs from the border: the centre box is the item, so a plain green photo is green.
    img = np.zeros((64, 64, 3))
    img[:] = (0.1, 0.6, 0.2)
    votes = colour_votes(img)
    assert max(votes, key=votes.get) == "green"
    assert sum(votes.values()) == pytest.approx(1.0)


def test_estimate_is_deterministic():
    data = _garment((220, 220, 210), (30, 120, 40))
    assert {estimate_colour(data) for _ in range(3)} == {"green"}


def test_bundled_metadata_matches_the_images_and_is_reproducible(tmp_path):
    """The shipped CSVs list every bundled image, and rewriting them from the images gives the same bytes."""
    for name, count in ((SAMPLE_NAME, 300), (QUERY_NAME, 20)):
        rows = read_sample_metadata(name)
        images = sorted(
            p.relative_to(bundled_path(name)).as_posix() for p in bundled_path(name).glob("*/*.jpg")
        )
        assert len(rows) == count and sorted(r["image"] for r in rows.values()) == images
        assert all(r["id"] == r["image"].rsplit(".", 1)[0] for r in rows.values())
        assert all(r["class"] == r["id"].split("/")[0] and r["colour"] in PALETTE for r in rows.values())
    # Rewrite from a copy of the queries (20 images: fast) and compare bytes with the shipped CSV.
    (tmp_path / QUERY_NAME).symlink_to(bundled_path(QUERY_NAME))
    (tmp_path / SAMPLE_NAME).mkdir()  # empty: only the query CSV is compared
    write_sample_metadata(tmp_path)
    assert metadata_csv_path(QUERY_NAME, tmp_path).read_bytes() == metadata_csv_path(QUERY_NAME).read_bytes()
    with metadata_csv_path(SAMPLE_NAME, tmp_path).open() as f:
        assert list(csv.reader(f)) == [["id", "image", "class", "colour"]]


def test_catalog_has_colours_to_ask_for():
    rows = read_sample_metadata(SAMPLE_NAME)
    per_class: dict[str, set[str]] = {}
    for row in rows.values():
        per_class.setdefault(row["class"], set()).add(row["colour"])
    assert len(per_class) == 10 and all(len(colours) >= 3 for colours in per_class.values())


def test_target_colours_differ_from_the_query_and_exist_in_its_class():
    catalog = {
        "a/1": {"class": "a", "colour": "red"},
        "a/2": {"class": "a", "colour": "red"},
        "a/3": {"class": "a", "colour": "blue"},
        "a/4": {"class": "a", "colour": "green"},
        "b/1": {"class": "b", "colour": "black"},
    }
    picked = pick_target_colours([("a", "red"), ("a", "blue"), ("a", "grey"), ("b", "black")], catalog)
    # class a ranks red (2), blue, green (1 each, by name); the n-th query of a class takes the n-th of
    # the colours other than its own. Class b has no other colour: no composed query.
    assert picked == ["blue", "green", "green", None]
    for (cls, own), wanted in zip([("a", "red"), ("a", "blue"), ("a", "grey")], picked[:3], strict=True):
        assert wanted != own and wanted in {r["colour"] for r in catalog.values() if r["class"] == cls}


def test_scaled_steps():
    assert scaled_steps(400, 0.15) == 60 and scaled_steps(20, 0.15) == 4 and scaled_steps(20, 0.3) == 6
