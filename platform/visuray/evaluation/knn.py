"""Weighted k-NN classification of embeddings, as DINO evaluates frozen features.

Each test item takes its ``k`` most similar training items (cosine similarity of L2-normalised vectors);
neighbour ``i`` votes for its class with weight ``exp(sim_i / T)``; the class with the most weight wins.
DINO's k=20, T=0.07 are the defaults. Neighbours are found in chunks with an exact FAISS index, so memory
is ``chunk_size x k``, never test x train.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def l2_normalise(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def stratified_item_split(
    labels: Sequence[Any], test_fraction: float = 0.5, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, test) with ``test_fraction`` of each class's items in test (at least one item of
    every class with two or more stays in train, so every test class has neighbours to be found)."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    labels_arr = np.asarray(labels)
    train, test = [], []
    for value in np.unique(labels_arr):
        items = rng.permutation(np.flatnonzero(labels_arr == value))
        n_test = min(int(round(len(items) * test_fraction)), len(items) - 1)
        test.extend(items[:n_test])
        train.extend(items[n_test:])
    return np.sort(np.array(train, dtype=np.int64)), np.sort(np.array(test, dtype=np.int64))


def knn_predict_scores(
    train_features: np.ndarray,
    train_labels: Sequence[Any],
    test_features: np.ndarray,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> tuple[np.ndarray, list[Any]]:
    """Class votes ``(num_test, num_classes)`` and the class of each column (sorted unique train labels)."""
    import faiss

    classes, codes = np.unique(np.asarray(train_labels), return_inverse=True)
    train = l2_normalise(train_features)
    test = l2_normalise(test_features)
    k = min(k, len(train))
    index = faiss.IndexFlatIP(train.shape[1])
    index.add(train)
    votes = np.zeros((len(test), len(classes)), dtype=np.float64)
    for start in range(0, len(test), chunk_size):
        sims, idx = index.search(test[start : start + chunk_size], k)
        weights = np.exp(sims.astype(np.float64) / temperature)
        rows = np.repeat(np.arange(len(idx)), k)
        np.add.at(votes[start : start + len(idx)], (rows, codes[idx].ravel()), weights.ravel())
    return votes, list(classes)


def knn_accuracy(
    train_features: np.ndarray,
    train_labels: Sequence[Any],
    test_features: np.ndarray,
    test_labels: Sequence[Any],
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Top-1 and top-5 accuracy of weighted k-NN (a test label absent from train counts as a miss)."""
    votes, classes = knn_predict_scores(
        train_features, train_labels, test_features, k, temperature, chunk_size
    )
    ranked = np.argsort(-votes, axis=1, kind="stable")
    class_arr = np.asarray(classes)
    truth = np.asarray(test_labels)
    top1 = class_arr[ranked[:, 0]] == truth
    top5 = (class_arr[ranked[:, :5]] == truth[:, None]).any(axis=1)
    return {
        "knn/top1": float(top1.mean()) if len(truth) else 0.0,
        "knn/top5": float(top5.mean()) if len(truth) else 0.0,
        "knn/k": float(k),
        "knn/temperature": float(temperature),
        "knn/num_train": float(len(train_features)),
        "knn/num_test": float(len(truth)),
    }
