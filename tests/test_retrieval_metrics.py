"""Chunked retrieval metrics against a brute-force reference over the full distance matrix."""

from __future__ import annotations

import numpy as np
import pytest

from visuray.evaluation.retrieval import retrieval_metrics

pytestmark = pytest.mark.unit


def reference_metrics(q, ql, g, gl, ks, leave_one_out):
    """Slow reference: full similarity matrix, explicit loops, exact definitions."""
    sims = q @ g.T
    recall = {k: 0 for k in ks}
    aps = []
    for i in range(len(q)):
        order = [j for j in np.argsort(-sims[i], kind="stable") if not (leave_one_out and j == i)]
        rel = [gl[j] == ql[i] for j in order]
        for k in ks:
            recall[k] += any(rel[:k])
        r = sum(1 for j in range(len(g)) if gl[j] == ql[i] and not (leave_one_out and j == i))
        if r == 0:
            continue
        ap = 0.0
        correct = 0
        for rank in range(r):
            if rel[rank]:
                correct += 1
                ap += correct / (rank + 1)
        aps.append(ap / r)
    out = {f"recall@{k}": recall[k] / len(q) for k in ks}
    out["map@r"] = float(np.mean(aps))
    return out


def unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
def test_leave_one_out_matches_reference(chunk_size):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 6, size=80)
    centers = rng.normal(size=(6, 16))
    x = unit(centers[labels] + 1.2 * rng.normal(size=(80, 16))).astype(np.float32)
    got = retrieval_metrics(x, labels, ks=(1, 5, 10), chunk_size=chunk_size)
    want = reference_metrics(x, labels, x, labels, (1, 5, 10), leave_one_out=True)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key
    assert 0 < got["map@r"] < 1  # neither trivial nor perfect on this noisy data


def test_query_gallery_matches_reference():
    rng = np.random.default_rng(1)
    gl = rng.integers(0, 5, size=60)
    ql = rng.integers(0, 5, size=25)
    centers = rng.normal(size=(5, 8))
    g = unit(centers[gl] + rng.normal(size=(60, 8))).astype(np.float32)
    q = unit(centers[ql] + rng.normal(size=(25, 8))).astype(np.float32)
    got = retrieval_metrics(q, list(map(str, ql)), g, list(map(str, gl)), ks=(1, 10), chunk_size=4)
    want = reference_metrics(q, ql, g, gl, (1, 10), leave_one_out=False)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key


def test_perfect_embedding_scores_one():
    labels = np.repeat(np.arange(4), 5)
    x = np.eye(4, dtype=np.float32)[labels]
    got = retrieval_metrics(x, labels, ks=(1, 5))
    assert got["recall@1"] == 1.0 and got["map@r"] == pytest.approx(1.0)


def test_dimension_mismatch_is_an_error():
    with pytest.raises(ValueError, match="dim"):
        retrieval_metrics(np.zeros((2, 3)), [0, 1], np.zeros((2, 4)), [0, 1])
