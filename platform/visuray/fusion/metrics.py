"""Composed-retrieval metrics: Recall@k per category, Fashion IQ's (R@10 + R@50) / 2, CFQ-style metrics.

Recall@k (Fashion IQ's definition): the share of queries with at least one relevant gallery item among
their top k. The reference image is removed from its own ranked list before cutting at k (it is never
the answer to "the same, but in red"; CIRR does the same). Searches run a chunk of queries at a time
against an exact FAISS inner-product index, so memory is ``chunk x depth``, never queries x gallery.

Keys: ``recall@k`` (all queries), ``fiq_score`` = (recall@10 + recall@50) / 2 over all queries,
``category/<c>/recall@k`` and ``category/<c>/fiq_score`` per category, and ``fiq_score_category_mean``,
the mean of the per-category scores (the single number Fashion IQ papers put last in their tables).

CFQ-style (each (query, candidate) pair labelled for caption accuracy and image similarity): per label
kind (``caption``, ``image``, ``both`` = positive on both), the mean over queries of average precision
and of ROC AUC of the candidates ranked by score, over queries with at least one positive and one
negative candidate of that kind.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np


def ranked_lists(
    query: np.ndarray,
    gallery: np.ndarray,
    exclude: Sequence[int | None] | None = None,
    depth: int = 50,
    chunk_size: int = 1024,
) -> np.ndarray:
    """Top-``depth`` gallery indices of each query by inner product, each ``exclude[i]`` removed."""
    import faiss

    q = np.ascontiguousarray(query, dtype=np.float32)
    g = np.ascontiguousarray(gallery, dtype=np.float32)
    if q.ndim != 2 or g.ndim != 2 or q.shape[1] != g.shape[1]:
        raise ValueError(f"query {q.shape} and gallery {g.shape} must be 2-D with equal dims")
    depth = min(depth, len(g))
    index = faiss.IndexFlatIP(g.shape[1])
    index.add(g)
    extra = 1 if exclude is not None else 0
    out = np.full((len(q), depth), -1, dtype=np.int64)
    for start in range(0, len(q), chunk_size):
        stop = min(start + chunk_size, len(q))
        _, idx = index.search(q[start:stop], min(depth + extra, len(g)))
        for row in range(stop - start):
            hits = idx[row]
            if exclude is not None and exclude[start + row] is not None:
                hits = hits[hits != exclude[start + row]]
            out[start + row, : min(depth, len(hits))] = hits[:depth]
    return out


def first_hit_ranks(
    rankings: np.ndarray, gallery_ids: Sequence[str], relevant: Sequence[Sequence[str]]
) -> np.ndarray:
    """0-based rank of each query's first relevant item in its ranked list; ``inf`` where none is listed.

    Recall@k of one query is ``rank < k``; kept per query so that two models can be compared query by
    query (paired bootstrap) rather than only by their averages."""
    ids = np.asarray(list(gallery_ids) + [""], dtype=object)  # index -1 maps to "" (never relevant)
    hit_rank = np.full(len(rankings), np.inf)
    for i, (row, rel) in enumerate(zip(rankings, relevant, strict=True)):
        rel_set = set(rel)
        for rank, gid in enumerate(ids[row]):
            if gid in rel_set:
                hit_rank[i] = rank
                break
    return hit_rank


def recall_from_rankings(
    rankings: np.ndarray,
    gallery_ids: Sequence[str],
    relevant: Sequence[Sequence[str]],
    categories: Sequence[str],
    ks: Sequence[int] = (1, 10, 50),
) -> dict[str, float]:
    """Recall@k overall and per category from ranked gallery indices (-1 = no item)."""
    hit_rank = first_hit_ranks(rankings, gallery_ids, relevant)
    out: dict[str, float] = {}
    per_category: dict[str, list[int]] = defaultdict(list)
    for i, c in enumerate(categories):
        per_category[c].append(i)
    for k in ks:
        out[f"recall@{k}"] = float(np.mean(hit_rank < k)) if len(hit_rank) else 0.0
    for c, rows in sorted(per_category.items()):
        for k in ks:
            out[f"category/{c}/recall@{k}"] = float(np.mean(hit_rank[rows] < k))
    if 10 in ks and 50 in ks:
        out["fiq_score"] = (out["recall@10"] + out["recall@50"]) / 2
        scores = []
        for c in sorted(per_category):
            out[f"category/{c}/fiq_score"] = (
                out[f"category/{c}/recall@10"] + out[f"category/{c}/recall@50"]
            ) / 2
            scores.append(out[f"category/{c}/fiq_score"])
        out["fiq_score_category_mean"] = float(np.mean(scores)) if scores else 0.0
    out["num_queries"] = float(len(rankings))
    return out


def composed_recall(
    query_vectors: np.ndarray,
    gallery_vectors: np.ndarray,
    gallery_ids: Sequence[str],
    reference_ids: Sequence[str],
    relevant: Sequence[Sequence[str]],
    categories: Sequence[str],
    ks: Sequence[int] = (1, 10, 50),
    exclude_reference: bool = True,
    chunk_size: int = 1024,
) -> tuple[dict[str, float], np.ndarray]:
    """Recall metrics and the ranked gallery indices (for reports) of composed queries."""
    position = {gid: i for i, gid in enumerate(gallery_ids)}
    exclude = [position.get(r) for r in reference_ids] if exclude_reference else None
    rankings = ranked_lists(query_vectors, gallery_vectors, exclude, max(ks), chunk_size)
    return recall_from_rankings(rankings, gallery_ids, relevant, categories, ks), rankings


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """AP of a ranking by descending score (ties broken by order): mean precision at each positive."""
    order = np.argsort(-scores, kind="stable")
    rel = labels[order].astype(bool)
    if not rel.any():
        return float("nan")
    precision = np.cumsum(rel) / np.arange(1, len(rel) + 1)
    return float(precision[rel].mean())


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Probability that a positive outscores a negative (ties count one half); rank-based, O(n log n)."""
    from scipy.stats import rankdata

    labels = labels.astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def cfq_metrics(
    scores: Sequence[float],
    query_keys: Sequence[Any],
    caption_labels: Sequence[bool | None],
    image_labels: Sequence[bool | None],
) -> dict[str, float]:
    """CFQ-style metrics of scored (query, candidate) pairs; see the module docstring."""
    scores_a = np.asarray(scores, dtype=np.float64)
    groups: dict[Any, list[int]] = defaultdict(list)
    for i, key in enumerate(query_keys):
        groups[key].append(i)

    def label_array(kind: str, rows: list[int]) -> tuple[np.ndarray, np.ndarray]:
        keep, values = [], []
        for r in rows:
            c, m = caption_labels[r], image_labels[r]
            value = {"caption": c, "image": m, "both": None if c is None or m is None else (c and m)}[kind]
            if value is not None:
                keep.append(r)
                values.append(bool(value))
        return np.asarray(keep, dtype=np.int64), np.asarray(values, dtype=bool)

    out: dict[str, float] = {}
    for kind in ("caption", "image", "both"):
        aps, aucs = [], []
        for rows in groups.values():
            keep, labels = label_array(kind, rows)
            if labels.size == 0 or labels.all() or not labels.any():
                continue
            aps.append(average_precision(scores_a[keep], labels))
            aucs.append(roc_auc(scores_a[keep], labels))
        out[f"cfq/{kind}_map"] = float(np.mean(aps)) if aps else float("nan")
        out[f"cfq/{kind}_auc"] = float(np.mean(aucs)) if aucs else float("nan")
        out[f"cfq/{kind}_queries"] = float(len(aps))
    return out
