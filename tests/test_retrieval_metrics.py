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


def test_leave_one_out_with_duplicate_vectors_drops_only_the_query_itself():
    # Four identical vectors per class: the query's own row may not come first among the ties.
    labels = np.repeat(np.arange(3), 4)
    x = np.eye(3, dtype=np.float32)[labels]
    got = retrieval_metrics(x, labels, ks=(1, 3), chunk_size=5)
    assert got["recall@1"] == 1.0 and got["map@r"] == pytest.approx(1.0)


def test_l2_metric_matches_reference_on_unit_vectors():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 4, size=50)
    x = unit(rng.normal(size=(4, 8))[labels] + rng.normal(size=(50, 8))).astype(np.float32)
    got = retrieval_metrics(x, labels, ks=(1, 5), metric="l2", chunk_size=16)
    want = reference_metrics(x, labels, x, labels, (1, 5), leave_one_out=True)  # same ranking on the sphere
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key


def test_max_depth_truncates_map_at_r_and_says_so():
    rng = np.random.default_rng(3)
    labels = np.repeat(np.arange(2), 30)
    x = unit(rng.normal(size=(2, 8))[labels] + 0.8 * rng.normal(size=(60, 8))).astype(np.float32)
    got = retrieval_metrics(x, labels, ks=(1,), max_depth=10)
    assert got["map_at_r_truncated"] == 60.0
    # Truncated MAP@R: precision terms beyond rank 10 are missing, the 1/R normalisation stays.
    sims = x @ x.T
    expected = []
    for i in range(60):
        order = [j for j in np.argsort(-sims[i], kind="stable") if j != i][:10]
        rel = np.array([labels[j] == labels[i] for j in order])
        expected.append((np.cumsum(rel) / np.arange(1, 11) * rel).sum() / 29)
    assert got["map@r"] == pytest.approx(np.mean(expected), abs=1e-9)


def test_memory_does_not_grow_with_n_squared():
    import tracemalloc

    rng = np.random.default_rng(4)
    n = 3000  # an N x N float32 matrix would be 36 MB
    labels = rng.integers(0, 300, size=n)
    x = unit(rng.normal(size=(300, 16))[labels] + rng.normal(size=(n, 16))).astype(np.float32)
    tracemalloc.start()
    retrieval_metrics(x, labels, ks=(1, 5, 10), chunk_size=256)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 8 * 2**20, f"peak numpy allocation {peak / 2**20:.1f} MiB"
