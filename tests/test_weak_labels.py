"""Fine-grained classes from product titles: recovered styles, semantic distances, product lines."""

from __future__ import annotations

import numpy as np
import pytest

from visuray.metric_learning.weak_labels import NO_LABEL, fine_grained_classes, product_line_keys, tokenize

pytestmark = pytest.mark.unit

COLOURS = ["Black", "White", "Navy Blue", "Red", "Grey", "Green", "Brown", "Pink"]
STYLES = {
    # coarse label -> product styles (the fine-grained truth the titles carry)
    0: ["Nike Men Running Sports Shoes", "Clarks Men Leather Formal Shoes"],
    1: ["Roadster Women Cotton Printed Tshirt", "Puma Men Polo Collar Tshirt"],
}


def make_catalog() -> tuple[list[int], list[str], list[tuple[int, int]]]:
    coarse, titles, truth = [], [], []
    for c, styles in STYLES.items():
        for s, style in enumerate(styles):
            for colour in COLOURS:
                words = style.split()
                titles.append(" ".join(words[:2] + [colour] + words[2:]))
                coarse.append(c)
                truth.append((c, s))
    return coarse, titles, truth


def test_clusters_recover_the_styles_within_each_coarse_class() -> None:
    coarse, titles, truth = make_catalog()
    weak = fine_grained_classes(coarse, titles, coarse_names=["Shoes", "Tshirts"], target_size=8, min_size=4)
    assert weak.num_classes == 4
    # Same style <=> same fine class (a perfect clustering, up to renaming).
    for i in range(len(titles)):
        for j in range(len(titles)):
            assert (weak.labels[i] == weak.labels[j]) == (truth[i] == truth[j])
    assert sorted(weak.coarse_of.tolist()) == [0, 0, 1, 1]
    assert any(name.startswith("Shoes/") and "nike" in name for name in weak.names)


def test_semantic_distance_is_smaller_within_a_coarse_class() -> None:
    coarse, titles, _ = make_catalog()
    weak = fine_grained_classes(coarse, titles, target_size=8, min_size=4)
    d = weak.semantic_distances
    assert d.shape == (4, 4) and np.allclose(d, d.T) and np.all(np.diag(d) == 0)
    assert d.min() >= 0 and d.max() <= 1
    same = weak.coarse_of[:, None] == weak.coarse_of[None, :]
    off = ~np.eye(4, dtype=bool)
    # "Men ... Shoes" styles share words; a shoe style and a t-shirt style share fewer.
    assert d[same & off].max() < d[~same].min()


def test_small_clusters_are_merged_and_missing_text_or_labels_handled() -> None:
    coarse, titles, _ = make_catalog()
    coarse = coarse + [0, 0, 1, NO_LABEL]
    titles = titles + [None, "", "Odd Unique Singleton Tee", "Unlabelled Thing"]
    weak = fine_grained_classes(coarse, titles, target_size=4, min_size=6)
    counts = np.bincount(weak.labels[weak.labels >= 0])
    untitled = [i for i, n in enumerate(weak.names) if n.endswith("/untitled")]
    assert len(untitled) == 1 and counts[untitled[0]] == 2  # both title-less shoes, one class
    titled = np.setdiff1d(np.arange(weak.num_classes), untitled)
    assert counts[titled].min() >= 6  # no cluster below min_size survives
    assert weak.labels[-1] == NO_LABEL
    assert np.all(weak.semantic_distances[untitled[0], titled] == 1.0)


def test_deterministic_for_a_seed() -> None:
    coarse, titles, _ = make_catalog()
    a = fine_grained_classes(coarse, titles, target_size=5, seed=1)
    b = fine_grained_classes(coarse, titles, target_size=5, seed=1)
    assert np.array_equal(a.labels, b.labels) and a.names == b.names


def test_text_only_catalog_needs_a_single_coarse_class() -> None:
    _, titles, truth = make_catalog()
    weak = fine_grained_classes([0] * len(titles), titles, target_size=8, min_size=4)
    assert weak.num_classes == 4
    pure = all(len({truth[i] for i in np.flatnonzero(weak.labels == c)}) == 1 for c in range(4))
    assert pure


def test_product_line_keys_ignore_colour_words() -> None:
    titles = ["Nike Men Navy Blue Tee", "Nike Men Red Tee", "Nike Women Red Tee", None]
    keys = product_line_keys(titles, ["Navy Blue", "Red"])
    assert keys[0] == keys[1] == "nike men tee" and keys[2] == "nike women tee" and keys[3] == ""
    assert tokenize("T-Shirt, 2-Pack!") == ["shirt", "pack"]


def test_invalid_inputs() -> None:
    with pytest.raises(ValueError, match="no title has any word"):
        fine_grained_classes([0, 0], [None, "!"])
    with pytest.raises(ValueError, match="2 coarse labels but 1 titles"):
        fine_grained_classes([0, 0], ["a b"])
