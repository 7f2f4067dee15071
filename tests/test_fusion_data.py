"""Composed-retrieval data (templated queries, Fashion IQ and table readers, CFQ pairs) and metrics."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visuray.fusion.datasets import (
    FASHION_IQ_CATEGORIES,
    CatalogItem,
    DatasetFormatError,
    ImageFolder,
    catalog_items,
    fashion_products_queries,
    keep_queries_with_images,
    labelled_pairs,
    product_line_key,
    read_fashion_iq,
    read_fashion_iq_split,
    read_triplet_table,
    split_held_out,
    subset_items,
)
from visuray.fusion.metrics import (
    average_precision,
    cfq_metrics,
    composed_recall,
    first_hit_ranks,
    roc_auc,
)

pytestmark = pytest.mark.unit

REAL_FIQ = Path(__file__).resolve().parents[2] / "shared" / "data" / "fashion-iq-captions"


def _items() -> list[CatalogItem]:
    rows = [
        ("1", "Tshirts", "Blue", "Nike Men Blue T-shirt"),
        ("2", "Tshirts", "Red", "Nike Men Red T-shirt"),
        ("3", "Tshirts", "Navy Blue", "Puma Men Navy Blue Polo"),
        ("4", "Tshirts", "Red", "Puma Men Red Polo"),
        ("5", "Shoes", "Red", "Adidas Red Runner"),
        ("6", "Shoes", "Black", "Adidas Black Runner"),
        ("7", "Shoes", "Black", "Bata Black Loafer"),
    ]
    return catalog_items(
        [r[0] for r in rows],
        ["Topwear" if r[1] == "Tshirts" else "Shoes" for r in rows],
        [{"articleType": r[1], "baseColour": r[2]} for r in rows],
        [r[3] for r in rows],
    )


# ---------------------------------------------------------------- (a) templated queries


def test_product_line_key_removes_only_the_colour_words() -> None:
    assert product_line_key("Nike Men Blue T-shirt", "Blue") == product_line_key(
        "Nike Men Red T-shirt", "Red"
    )
    assert product_line_key("Puma Men Navy Blue Polo", "Navy Blue") == "puma men polo"
    assert product_line_key("Bluebird Shirt", "Blue") == "bluebird shirt"  # whole words only


def test_items_without_a_title_have_no_product_line() -> None:
    """A catalog without titles (an image folder with a colour column) reads back None or NaN titles:
    such items still form "same type, in <colour>" queries, and no colour-variant line."""
    items = catalog_items(
        ["a", "b", "c"],
        ["hat", "hat", "hat"],
        [{"class": "hat", "colour": "Red"}] * 3,
        [None, float("nan"), "Red Cap"],
        type_key="class",
        colour_key="colour",
    )
    assert [(i.article_type, i.colour, i.product_line) for i in items] == [
        ("hat", "red", ""),
        ("hat", "red", ""),
        ("hat", "red", "hat|cap"),
    ]


def test_type_colour_queries_list_every_item_of_that_type_and_colour() -> None:
    items = _items()
    queries = fashion_products_queries(items, kinds=["type_colour"], seed=0, type_colour_per_item=3)
    by_id = {i.item_id: i for i in items}
    assert queries
    for q in queries:
        ref = by_id[q.reference_id]
        asked = {by_id[r].colour for r in q.relevant_ids}
        assert len(asked) == 1 and ref.colour not in asked
        colour = asked.pop()
        assert colour in q.text and q.target_id in q.relevant_ids
        expected = {i.item_id for i in items if i.article_type == ref.article_type and i.colour == colour}
        assert set(q.relevant_ids) == expected
    # item 1 (blue t-shirt) may ask for red, navy blue: red has two answers
    red = [q for q in queries if q.reference_id == "1" and "red" in q.text]
    assert red and set(red[0].relevant_ids) == {"2", "4"}


def test_colour_variant_queries_stay_within_a_product_line() -> None:
    queries = fashion_products_queries(_items(), kinds=["colour_variant"], seed=0)
    pairs = {(q.reference_id, q.target_id) for q in queries}
    assert pairs == {("1", "2"), ("2", "1"), ("3", "4"), ("4", "3"), ("5", "6"), ("6", "5")}
    assert all(q.kind == "colour_variant" and q.relevant_ids == (q.target_id,) for q in queries)


def test_held_out_split_keeps_product_lines_together_and_subset_is_deterministic() -> None:
    items = _items() * 1
    train, test = split_held_out(items, 0.5, seed=3)
    lines_train = {i.product_line for i in train}
    assert not lines_train & {i.product_line for i in test}
    assert len(train) + len(test) == len(items)
    assert subset_items(items, 4, seed=1) == subset_items(items, 4, seed=1)
    assert len(subset_items(items, 4, seed=1)) <= 4


def test_validation_split_with_a_subset_takes_only_some_training_lines() -> None:
    """The subset keeps the lines lowest under one hash; the validation split must use another, or every
    kept training line would land in validation (and training would be empty)."""
    from visuray.fusion.config import DataSection
    from visuray.fusion.data import build_fusion_data

    items = [
        CatalogItem(f"{line}-{colour}", "Tshirts", colour.lower(), "Apparel", f"brand{line} men tshirt")
        for line in range(60)
        for colour in ("Red", "Blue")
    ]
    data = build_fusion_data(items, DataSection(max_items=40, test_fraction=0.25, val_fraction=0.3, seed=0))
    lines = [{i.product_line for i in split} for split in (data.train_items, data.val_items, data.test_items)]
    assert all(lines) and not (lines[0] & lines[1] or lines[0] & lines[2] or lines[1] & lines[2])
    assert len(data.train_items) > len(data.val_items) and data.val_queries and data.train_queries
    without_val = build_fusion_data(items, DataSection(max_items=40, test_fraction=0.25, seed=0))
    assert without_val.test_items == data.test_items  # validation comes out of training only


# ---------------------------------------------------------------- (b) readers


def _write_fiq(root: Path) -> None:
    (root / "captions").mkdir(parents=True)
    (root / "image_splits").mkdir()
    for category in FASHION_IQ_CATEGORIES:
        for split in ("val", "test"):
            records = [
                {
                    "candidate": f"{category}-a",
                    "captions": ["is red", "has short sleeves"],
                    "target": f"{category}-b",
                },
                {
                    "candidate": f"{category}-b",
                    "captions": ["is blue", " longer "],
                    "target": f"{category}-a",
                },
            ]
            if split == "test":
                for r in records:
                    r.pop("target")
            (root / "captions" / f"cap.{category}.{split}.json").write_text(json.dumps(records))
            (root / "image_splits" / f"split.{category}.{split}.json").write_text(
                json.dumps([f"{category}-a", f"{category}-b"])
            )


def test_fashion_iq_reader_on_a_generated_copy(tmp_path: Path) -> None:
    _write_fiq(tmp_path)
    val = read_fashion_iq(str(tmp_path), "val")
    assert len(val) == 6 and {t.category for t in val} == set(FASHION_IQ_CATEGORIES)
    first = val[0]
    assert first.candidate == "dress-a" and first.target == "dress-b"
    assert first.text() == "is red and has short sleeves"
    assert val[1].text() == "is blue and longer"
    q = first.to_query()
    assert q.reference_id == "dress-a" and q.relevant_ids == ("dress-b",) and q.kind == "fashion_iq"
    test = read_fashion_iq(str(tmp_path), "test", categories=["shirt"])
    assert all(t.target is None and t.to_query().relevant_ids == () for t in test)
    assert read_fashion_iq_split(str(tmp_path), "toptee", "val") == ["toptee-a", "toptee-b"]


def test_fashion_iq_reader_names_the_bad_record(tmp_path: Path) -> None:
    _write_fiq(tmp_path)
    bad = tmp_path / "captions" / "cap.dress.val.json"
    bad.write_text(json.dumps([{"candidate": "x", "captions": ["ok"]}, {"captions": ["no candidate"]}]))
    with pytest.raises(DatasetFormatError, match=r"cap\.dress\.val\.json: record 1 has no 'candidate'"):
        read_fashion_iq(str(tmp_path), "val", ["dress"])
    bad.write_text("{not json")
    with pytest.raises(DatasetFormatError, match="not valid JSON"):
        read_fashion_iq(str(tmp_path), "val", ["dress"])
    with pytest.raises(DatasetFormatError, match="no file"):
        read_fashion_iq(str(tmp_path / "nowhere"), "val", ["dress"])


@pytest.mark.skipif(not REAL_FIQ.is_dir(), reason="../shared/data/fashion-iq-captions is not on this machine")
def test_fashion_iq_reader_on_the_real_files() -> None:
    for split, has_target in (("train", True), ("val", True), ("test", False)):
        triplets = read_fashion_iq(str(REAL_FIQ), split)
        assert len(triplets) > 1000
        assert {t.category for t in triplets} == set(FASHION_IQ_CATEGORIES)
        assert all(len(t.captions) == 2 for t in triplets)
        assert all((t.target is not None) == has_target for t in triplets)
    val = read_fashion_iq(str(REAL_FIQ), "val", ["dress"])
    assert val[0].candidate == "B005X4PL1G" and val[0].target == "B0084Y8XIU"
    assert val[0].text() == "is shiny and silver with shorter sleeves and fit and flare"
    gallery = set(read_fashion_iq_split(str(REAL_FIQ), "dress", "val"))
    assert sum(t.target in gallery for t in val) / len(val) > 0.95


def _jpeg(path: Path, colour: tuple[int, int, int]) -> None:
    Image.new("RGB", (8, 8), colour).save(path, format="JPEG")


def test_triplet_table_and_image_folder(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for name, colour in (("a", (255, 0, 0)), ("b", (0, 0, 255)), ("c", (0, 255, 0))):
        _jpeg(images / f"{name}.jpg", colour)
    table = tmp_path / "triplets.csv"
    table.write_text("ref,text,tgt,cat\na,make it blue,b,tops\nb,,c,tops\nc,add red,zzz,shoes\n")
    queries = read_triplet_table(str(table), "ref", "text", "tgt", "cat")
    assert [(q.reference_id, q.text, q.target_id, q.category) for q in queries] == [
        ("a", "make it blue", "b", "tops"),
        ("b", "", "c", "tops"),
        ("c", "add red", "zzz", "shoes"),
    ]
    folder = ImageFolder(str(images))
    assert folder.read("a")[:2] == b"\xff\xd8" and "b" in folder
    assert folder.missing(queries) == ["zzz"]
    kept, dropped = keep_queries_with_images(queries, folder)
    assert len(kept) == 2 and dropped == 1
    with pytest.raises(KeyError, match="zzz"):
        folder.read("zzz")
    with pytest.raises(DatasetFormatError, match="missing column"):
        read_triplet_table(str(table))
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text('{"reference": "a", "caption": "x", "target": "b"}\n')
    assert read_triplet_table(str(jsonl))[0].category == "all"


# ---------------------------------------------------------------- (c) CFQ-style pairs


def test_labelled_pairs_carry_caption_and_image_labels_from_attributes() -> None:
    items = _items()
    queries = fashion_products_queries(items, kinds=["type_colour"], seed=0, type_colour_per_item=1)
    pairs = labelled_pairs(queries, items, candidates_per_group=5, seed=0)
    by_id = {i.item_id: i for i in items}
    assert pairs
    for p in pairs:
        q = queries[p.query_index]
        ref, cand = by_id[q.reference_id], by_id[p.candidate_id]
        asked = {by_id[r].colour for r in q.relevant_ids}
        assert p.candidate_id != q.reference_id
        assert p.caption_match == (cand.colour in asked)
        assert p.image_similar == (cand.article_type == ref.article_type)


# ---------------------------------------------------------------- metrics vs references


def slow_recall(query, gallery, gallery_ids, reference_ids, relevant, k):
    hits = 0
    for q, ref, rel in zip(query, reference_ids, relevant, strict=True):
        scores = [(float(q @ g), j) for j, g in enumerate(gallery) if gallery_ids[j] != ref]
        scores.sort(key=lambda s: (-s[0], s[1]))
        hits += any(gallery_ids[j] in rel for _, j in scores[:k])
    return hits / len(query)


def test_composed_recall_matches_a_brute_force_reference() -> None:
    rng = np.random.default_rng(0)
    gallery = rng.normal(size=(120, 8)).astype(np.float32)
    query = rng.normal(size=(40, 8)).astype(np.float32)
    ids = [f"g{i}" for i in range(120)]
    reference_ids = [ids[int(rng.integers(120))] for _ in range(40)]
    relevant = [
        tuple(ids[int(j)] for j in rng.choice(120, size=int(rng.integers(1, 4)), replace=False))
        for _ in range(40)
    ]
    categories = ["dress" if i % 3 else "shirt" for i in range(40)]
    metrics, rankings = composed_recall(
        query, gallery, ids, reference_ids, relevant, categories, ks=(1, 10, 50)
    )
    for k in (1, 10, 50):
        assert metrics[f"recall@{k}"] == pytest.approx(
            slow_recall(query, gallery, ids, reference_ids, relevant, k)
        )
        for c in ("dress", "shirt"):
            rows = [i for i in range(40) if categories[i] == c]
            expected = slow_recall(
                query[rows], gallery, ids, [reference_ids[i] for i in rows], [relevant[i] for i in rows], k
            )
            assert metrics[f"category/{c}/recall@{k}"] == pytest.approx(expected)
    assert metrics["fiq_score"] == pytest.approx((metrics["recall@10"] + metrics["recall@50"]) / 2)
    assert metrics["fiq_score_category_mean"] == pytest.approx(
        (metrics["category/dress/fiq_score"] + metrics["category/shirt/fiq_score"]) / 2
    )
    # the reference is never in its own ranked list
    assert all(ids[j] != ref for row, ref in zip(rankings, reference_ids, strict=True) for j in row)
    # per query: the rank of the first relevant item, as the brute-force order gives it (inf past 50)
    ranks = first_hit_ranks(rankings, ids, relevant)
    for i in range(40):
        order = sorted(
            (j for j in range(120) if ids[j] != reference_ids[i]),
            key=lambda j: (-float(query[i] @ gallery[j]), j),
        )
        expected = next((r for r, j in enumerate(order[:50]) if ids[j] in relevant[i]), np.inf)
        assert ranks[i] == expected


def slow_ap(scores, labels):
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    hits, total = 0, 0.0
    for rank, i in enumerate(order, start=1):
        if labels[i]:
            hits += 1
            total += hits / rank
    return total / sum(labels)


def slow_auc(scores, labels):
    pos = [s for s, label in zip(scores, labels, strict=True) if label]
    neg = [s for s, label in zip(scores, labels, strict=True) if not label]
    return sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))


def test_cfq_metrics_match_slow_references() -> None:
    rng = np.random.default_rng(1)
    n = 60
    scores = rng.normal(size=n).round(1)  # rounding makes ties, which AUC counts as one half
    keys = [i // 10 for i in range(n)]
    caption = [bool(rng.integers(2)) for _ in range(n)]
    image = [None if i % 7 == 0 else bool(rng.integers(2)) for i in range(n)]
    got = cfq_metrics(scores, keys, caption, image)
    for kind in ("caption", "image", "both"):
        aps, aucs = [], []
        for key in range(6):
            rows = [i for i in range(n) if keys[i] == key]
            labels = {
                "caption": [caption[i] for i in rows],
                "image": [image[i] for i in rows],
                "both": [None if image[i] is None else caption[i] and image[i] for i in rows],
            }[kind]
            kept = [(scores[r], lab) for r, lab in zip(rows, labels, strict=True) if lab is not None]
            labs = [lab for _, lab in kept]
            if not labs or all(labs) or not any(labs):
                continue
            aps.append(slow_ap([s for s, _ in kept], labs))
            aucs.append(slow_auc([s for s, _ in kept], labs))
        assert got[f"cfq/{kind}_queries"] == len(aps)
        assert got[f"cfq/{kind}_auc"] == pytest.approx(np.mean(aucs))
        assert got[f"cfq/{kind}_map"] == pytest.approx(np.mean(aps))  # ties: both keep input order
    distinct = rng.permutation(20).astype(float)
    labels = np.array([i % 3 == 0 for i in range(20)])
    assert average_precision(distinct, labels) == pytest.approx(slow_ap(list(distinct), list(labels)))
    assert roc_auc(distinct, labels) == pytest.approx(slow_auc(list(distinct), list(labels)))
    assert math.isnan(average_precision(distinct, np.zeros(20, dtype=bool)))
