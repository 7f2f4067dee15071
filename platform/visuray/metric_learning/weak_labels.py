"""Weak fine-grained labels from product-title text, for the adaptive triplet loss (ATL).

Annotators give catalogs coarse labels (an article type: "Tshirts", "Casual Shoes"); what shoppers mean by
"the same kind of product" is finer, and the product title says it ("Nike Men Blue Running Shoes" vs
"Puma Women White Sneakers"). This module derives fine-grained classes from titles alone, with no
annotation beyond the coarse label, and a semantic distance between those classes.

Method (deterministic for a given seed):

1. **Text vectors.** Each title is tokenised (lower case, alphanumeric tokens of two or more characters)
   and turned into a TF-IDF vector (scikit-learn's ``TfidfVectorizer``, sub-linear term frequency,
   smoothed IDF over the whole catalog, rows L2-normalised). Rare, specific words (brand, model, style)
   weigh more than words every title shares.
2. **Clusters within each coarse class.** The titles of one coarse class are clustered with k-means on
   the unit TF-IDF vectors (spherical k-means up to the final normalisation), with
   ``k = max(1, n // target_size)`` so a fine class holds about ``target_size`` items. Clusters smaller
   than ``min_size`` are merged into the cluster with the nearest centroid (a P x K batch needs K items
   of a class). Rows without a title form one fine class per coarse class. Fine classes never cross
   coarse classes: the coarse label, where it exists, is trusted.
3. **Semantic distance** between fine classes: ``1 - cos`` of their mean TF-IDF vectors, in [0, 1]
   (TF-IDF is non-negative). Two clusters of the same article type that share brand and style words are
   close; a t-shirt cluster and a shoe cluster share almost nothing and are at distance ~1.

The adaptive triplet loss uses the fine classes as its labels and the semantic distance to set each
triplet's margin. With no coarse labels at all, pass one coarse label for every row: the clusters then
come from the text alone.

:func:`product_line_keys` is a different, exact grouping used for evaluation: titles that are equal once
their colour words are removed belong to one product line ("Nike Men Blue Tee" and "Nike Men Red Tee").
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

NO_LABEL = -1
TOKEN_PATTERN = r"(?u)\b[a-z0-9][a-z0-9]+\b"
_TOKEN_RE = re.compile(TOKEN_PATTERN)


def tokenize(text: str | None) -> list[str]:
    """Lower-case alphanumeric tokens of two or more characters (the TF-IDF vocabulary's tokens)."""
    return _TOKEN_RE.findall((text or "").lower())


@dataclass
class WeakLabels:
    """Fine-grained classes of a catalog's rows and the semantic distances between them."""

    labels: np.ndarray  # (N,) fine class of each row; NO_LABEL where the coarse label is missing
    names: list[str]  # (C,) a readable name: coarse name and the cluster's top title words
    coarse_of: np.ndarray  # (C,) the coarse label each fine class belongs to
    semantic_distances: np.ndarray  # (C, C) float32 in [0, 1], zero on the diagonal

    @property
    def num_classes(self) -> int:
        return len(self.names)


def title_vectors(titles: Sequence[str | None]):  # noqa: ANN201 - a scipy sparse matrix
    """Unit TF-IDF rows (CSR) of ``titles`` and the vocabulary, as described in the module docstring."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    vectorizer = TfidfVectorizer(
        lowercase=True, token_pattern=TOKEN_PATTERN, sublinear_tf=True, smooth_idf=True, norm="l2"
    )
    texts = [t or "" for t in titles]
    if not any(tokenize(t) for t in texts):
        raise ValueError("no title has any word: fine-grained classes cannot be derived from the text")
    matrix = vectorizer.fit_transform(texts).tocsr().astype(np.float32)
    return matrix, list(vectorizer.get_feature_names_out())


def _unit_rows(matrix: np.ndarray) -> np.ndarray:
    return matrix / np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)


def _cluster_titles(vectors, target_size: int, min_size: int, seed: int) -> np.ndarray:  # noqa: ANN001
    """Cluster ids (0..k-1, consecutive) for the rows of ``vectors`` (unit TF-IDF, CSR)."""
    n = vectors.shape[0]
    k = max(1, n // target_size)
    if k == 1:
        return np.zeros(n, dtype=np.int64)
    from sklearn.cluster import KMeans

    assign = KMeans(n_clusters=k, n_init=3, random_state=seed).fit_predict(vectors)
    while True:
        ids, counts = np.unique(assign, return_counts=True)
        if len(ids) == 1 or counts.min() >= min_size:
            break
        small = ids[np.argmin(counts)]
        centroids = _unit_rows(np.stack([np.asarray(vectors[assign == i].mean(axis=0)).ravel() for i in ids]))
        similarity = centroids @ centroids[ids == small][0]
        similarity[ids == small] = -np.inf
        assign[assign == small] = ids[int(np.argmax(similarity))]
    return np.unique(assign, return_inverse=True)[1]


def _top_words(centroid: np.ndarray, vocabulary: list[str], count: int = 3) -> str:
    order = np.argsort(-centroid, kind="stable")[:count]
    return "-".join(vocabulary[i] for i in order if centroid[i] > 0) or "untitled"


def fine_grained_classes(
    coarse_labels: Sequence[int] | np.ndarray,
    titles: Sequence[str | None],
    coarse_names: Sequence[str] | None = None,
    target_size: int = 16,
    min_size: int = 4,
    seed: int = 0,
) -> WeakLabels:
    """Fine-grained classes from titles within each coarse class (see the module docstring).

    ``coarse_labels`` are integers (``NO_LABEL`` for rows to leave out); ``target_size`` is the intended
    number of items per fine class, ``min_size`` the smallest allowed (K of the P x K batches).
    """
    if target_size < 1 or min_size < 1:
        raise ValueError(f"target_size and min_size must be at least 1 (got {target_size}, {min_size})")
    coarse = np.asarray(coarse_labels, dtype=np.int64)
    if len(coarse) != len(titles):
        raise ValueError(f"{len(coarse)} coarse labels but {len(titles)} titles")
    vectors, vocabulary = title_vectors(titles)
    has_text = np.asarray(vectors.getnnz(axis=1) > 0)

    labels = np.full(len(coarse), NO_LABEL, dtype=np.int64)
    names: list[str] = []
    coarse_of: list[int] = []
    centroids: list[np.ndarray] = []
    for c in np.unique(coarse[coarse != NO_LABEL]):
        coarse_name = coarse_names[c] if coarse_names is not None else str(c)
        rows = np.flatnonzero((coarse == c) & has_text)
        assign = _cluster_titles(vectors[rows], target_size, min_size, seed) if len(rows) else rows
        groups = [rows[assign == i] for i in range(int(assign.max(initial=-1)) + 1)]
        untitled = np.flatnonzero((coarse == c) & ~has_text)
        for group in groups:
            centroid = np.asarray(vectors[group].mean(axis=0)).ravel()
            labels[group] = len(names)
            names.append(f"{coarse_name}/{_top_words(centroid, vocabulary)}")
            coarse_of.append(int(c))
            centroids.append(centroid)
        if len(untitled):
            labels[untitled] = len(names)
            names.append(f"{coarse_name}/untitled")
            coarse_of.append(int(c))
            centroids.append(np.zeros(vectors.shape[1], dtype=np.float32))

    unit = _unit_rows(np.stack(centroids).astype(np.float64))
    distances = np.clip(1.0 - unit @ unit.T, 0.0, 1.0)
    # An untitled class has a zero centroid: treat it as unrelated to every other class.
    empty = ~unit.any(axis=1)
    distances[empty, :] = 1.0
    distances[:, empty] = 1.0
    np.fill_diagonal(distances, 0.0)
    return WeakLabels(labels, names, np.asarray(coarse_of, dtype=np.int64), distances.astype(np.float32))


def product_line_keys(titles: Iterable[str | None], colour_words: Iterable[str]) -> list[str]:
    """A key per title: its tokens with colour words removed. Equal keys = one product line."""
    colours = {token for word in colour_words for token in tokenize(word)}
    return [" ".join(t for t in tokenize(title) if t not in colours) for title in titles]
