"""Retrieval metrics: Recall@k and MAP@R, query/gallery or leave-one-out, computed in chunks with FAISS.

Memory stays bounded by the gallery (one copy inside the FAISS index) plus ``chunk_size x depth`` (ids
and scores of the retrieved lists, and the per-rank arrays of the vectorised metrics), never by ``N x N``:
queries are searched a chunk at a time against an exact FAISS index of the gallery, where ``depth`` is the
largest of ``max(ks)`` and R (the number of relevant gallery items of the query's class, needed for MAP@R),
capped by ``max_depth``. 100k x 512 float32 embeddings (leave-one-out) stay well under 1 GiB peak RSS;
``benchmarks/retrieval_memory.py`` measures it beside the naive N x N computation.

Definitions (as in the metric-learning literature):
- Recall@k: share of queries with at least one item of the same label among their top k.
- MAP@R: for a query with R relevant gallery items, ``1/R * sum_{i<=R} P(i) * rel(i)`` over the top R,
  where P(i) is the precision at rank i.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def _label_codes(*arrays: Sequence[Any]) -> list[np.ndarray]:
    vocab: dict[Any, int] = {}
    out = []
    for arr in arrays:
        out.append(np.array([vocab.setdefault(x, len(vocab)) for x in arr], dtype=np.int64))
    return out


def _drop_own_rows(idx: np.ndarray, own: np.ndarray) -> np.ndarray:
    """Remove each query's own id from its list of ``depth + 1`` (it may not be first when duplicates
    tie); where it is absent, the last (farthest) entry goes instead, so every row keeps ``depth``."""
    keep = idx != own[:, None]
    absent = keep.all(axis=1)
    keep[absent, -1] = False
    return idx[keep].reshape(len(idx), idx.shape[1] - 1)


def retrieval_metrics(
    query: np.ndarray,
    query_labels: Sequence[Any],
    gallery: np.ndarray | None = None,
    gallery_labels: Sequence[Any] | None = None,
    ks: Sequence[int] = (1, 5, 10),
    metric: str = "ip",
    chunk_size: int = 1024,
    max_depth: int = 1000,
) -> dict[str, float]:
    """Recall@k and MAP@R of ``query`` against ``gallery``; leave-one-out when ``gallery`` is None.

    ``metric`` is "ip" (inner product: cosine for unit vectors) or "l2". ``max_depth`` caps how far a
    list is retrieved for MAP@R (classes larger than that are scored on their first ``max_depth`` items,
    and the result says so in ``map_at_r_truncated``).
    """
    import faiss

    leave_one_out = gallery is None
    if leave_one_out:
        gallery, gallery_labels = query, query_labels
    assert gallery is not None and gallery_labels is not None
    q = np.ascontiguousarray(query, dtype=np.float32)
    g = np.ascontiguousarray(gallery, dtype=np.float32)
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"query dim {q.shape[1]} != gallery dim {g.shape[1]}")
    q_codes, g_codes = _label_codes(query_labels, gallery_labels)
    class_sizes = np.bincount(g_codes, minlength=int(max(q_codes.max(initial=0), g_codes.max()) + 1))
    relevant = class_sizes[q_codes] - (1 if leave_one_out else 0)
    depth = int(min(max(max(ks), int(relevant.max(initial=0))), max_depth))
    depth = min(depth, len(g) - (1 if leave_one_out else 0))
    index = faiss.IndexFlatIP(g.shape[1]) if metric == "ip" else faiss.IndexFlatL2(g.shape[1])
    index.add(g)

    hits = {k: 0 for k in ks}
    ap_sum = 0.0
    truncated = 0
    evaluated = 0
    ranks = np.arange(1, depth + 1)
    for start in range(0, len(q), chunk_size):
        stop = min(start + chunk_size, len(q))
        _, idx = index.search(q[start:stop], depth + (1 if leave_one_out else 0))
        if leave_one_out:
            idx = _drop_own_rows(idx, np.arange(start, stop))
        # FAISS pads with -1 when the gallery is shorter than the list; -1 never matches a label code.
        rel = np.where(idx >= 0, g_codes[np.maximum(idx, 0)], -1) == q_codes[start:stop, None]
        for k in ks:
            hits[k] += int(rel[:, :k].any(axis=1).sum())
        r = relevant[start:stop]
        has_relevant = r > 0  # a query with no relevant item has no defined MAP@R
        r_eff = np.minimum(r, depth)
        within_r = ranks[None, :] <= r_eff[:, None]
        precision = np.cumsum(rel, axis=1) / ranks[None, :]
        ap = (precision * rel * within_r).sum(axis=1) / np.maximum(r, 1)
        ap_sum += float(ap[has_relevant].sum())
        evaluated += int(has_relevant.sum())
        truncated += int((r > depth).sum())
    n = len(q)
    out = {f"recall@{k}": hits[k] / n for k in ks}
    out["map@r"] = ap_sum / max(evaluated, 1)
    out["num_queries"] = float(n)
    out["map_at_r_truncated"] = float(truncated)
    return out
