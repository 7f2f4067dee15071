"""Evaluations of frozen embeddings on a labelled catalog: k-NN, few-shot, zero-shot retrieval.

Given the embeddings of a catalog (:mod:`visuray.index.evaluate` embeds one with Ray Data):

- ``knn``: weighted k-NN accuracy with a per-class split of the *items* (every class on both sides);
- ``fewshot``: N-way K-shot episodes on *held-out classes* (prototype and logistic-regression heads);
- ``zeroshot``: leave-one-out Recall@k and MAP@R among the items of the held-out classes only.

Held-out classes are a seeded random ``holdout_fraction`` of the catalog's classes (all of them with 1.0):
for a model fine-tuned on the other classes, they are the classes it has never seen labels of. Labels come
from the catalog's ``label`` column; unlabelled items are left out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from visuray.evaluation.fewshot import fewshot_accuracy
from visuray.evaluation.knn import knn_accuracy, l2_normalise, stratified_item_split
from visuray.evaluation.retrieval import retrieval_metrics

TASKS = ("knn", "fewshot", "zeroshot")


@dataclass
class SSLEvalOptions:
    """Protocol knobs; the defaults are the literature's (DINO's k-NN, 5-way 1/5-shot, 600 episodes)."""

    k: int = 20
    temperature: float = 0.07
    test_fraction: float = 0.5
    holdout_fraction: float = 0.5
    n_way: int = 5
    shots: Sequence[int] = (1, 5)
    n_query: int = 15
    episodes: int = 600
    ks: Sequence[int] = (1, 5, 10)
    seed: int = 0


def heldout_classes(labels: Sequence[Any], fraction: float, seed: int = 0) -> list[Any]:
    """A seeded random ``fraction`` of the distinct labels (at least one), sorted."""
    if not 0 < fraction <= 1:
        raise ValueError(f"holdout_fraction must lie in (0, 1], got {fraction}")
    classes = sorted(set(labels))
    count = max(1, int(round(len(classes) * fraction)))
    picked = np.random.default_rng(seed).choice(len(classes), count, replace=False)
    return sorted(classes[i] for i in picked)


def evaluate_embeddings(
    vectors: np.ndarray, labels: Sequence[Any], tasks: Sequence[str], opts: SSLEvalOptions
) -> dict[str, Any]:
    """Run ``tasks`` (subset of :data:`TASKS`) on embeddings with their labels."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; choose from {TASKS}")
    vectors = l2_normalise(vectors)
    labels_arr = np.asarray(labels, dtype=object)
    out: dict[str, Any] = {}
    if "knn" in tasks:
        train, test = stratified_item_split(labels_arr, opts.test_fraction, opts.seed)
        metrics = knn_accuracy(
            vectors[train], labels_arr[train], vectors[test], labels_arr[test], opts.k, opts.temperature
        )
        out.update({f"eval/{k}": v for k, v in metrics.items()})
    if "fewshot" in tasks or "zeroshot" in tasks:
        held = heldout_classes(labels_arr.tolist(), opts.holdout_fraction, opts.seed)
        mask = np.isin(labels_arr, np.asarray(held, dtype=object))
        out["eval/heldout_classes"] = [str(c) for c in held]
        if "fewshot" in tasks:
            metrics = fewshot_accuracy(
                vectors[mask], labels_arr[mask].tolist(), opts.n_way, opts.shots, opts.n_query,
                opts.episodes, seed=opts.seed,
            )  # fmt: skip
            out.update({f"eval/{k}": v for k, v in metrics.items()})
        if "zeroshot" in tasks:
            metrics = retrieval_metrics(vectors[mask], labels_arr[mask].tolist(), ks=opts.ks)
            out.update({f"eval/zeroshot/{k}": v for k, v in metrics.items()})
    return out
