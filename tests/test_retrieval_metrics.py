"""Chunked retrieval metrics against a brute-force reference over the full distance matrix."""

from __future__ import annotations

import numpy as np
import pytest

from visuray.evaluation.retrieval import _drop_own_rows, retrieval_metrics

pytestmark = pytest.mark.unit


def reference_metrics(q, ql, g, gl, ks, leave_one_out, metric="ip"):
    """Slow reference: full similarity matrix, explicit loops, exact definitions."""
    sims = q @ g.T if metric == "ip" else -((q[:, None, :] - g[None, :, :]) ** 2).sum(-1)
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


@pytest.mark.parametrize("metric", ["ip", "l2", None])
def test_metric_choice_matters_off_the_sphere(metric: str | None) -> None:
    # Vectors of very different norms rank differently by inner product and by L2 distance; the default
    # is the inner product.
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 4, size=40)
    x = (rng.normal(size=(4, 6))[labels] + rng.normal(size=(40, 6))) * rng.uniform(0.2, 5, size=(40, 1))
    x = x.astype(np.float64)  # FAISS takes float32: the conversion is the function's, not the caller's
    kwargs = {} if metric is None else {"metric": metric}
    got = retrieval_metrics(x, labels, ks=(1, 5), **kwargs)
    want = reference_metrics(x, labels, x, labels, (1, 5), leave_one_out=True, metric=metric or "ip")
    other = reference_metrics(
        x, labels, x, labels, (1, 5), True, metric="l2" if metric in (None, "ip") else "ip"
    )
    assert want != other  # the two metrics disagree on this data
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key


def test_own_row_is_dropped_or_else_the_farthest():
    idx = np.array([[0, 1, 2], [0, 1, 2], [5, 0, 1]])
    # Row 0: its own id 1 goes. Row 1: id 7 is absent (ties crowded it out), so the last entry goes.
    np.testing.assert_array_equal(_drop_own_rows(idx, np.array([1, 7, 5])), [[0, 2], [0, 1], [0, 1]])


def test_default_max_depth_is_1000():
    labels = np.r_[np.zeros(1002, dtype=int), np.ones(3, dtype=int)]
    x = np.random.default_rng(5).normal(size=(len(labels), 4)).astype(np.float32)
    got = retrieval_metrics(x, labels, ks=(1,))
    assert got["map_at_r_truncated"] == 1002.0  # R = 1001 for the big class: past the default depth
    chunked = retrieval_metrics(x, labels, ks=(1,), chunk_size=100)  # counted over every chunk
    assert chunked["map_at_r_truncated"] == 1002.0 and chunked["map@r"] == pytest.approx(got["map@r"])


def test_queries_with_a_single_relevant_item():
    # Pairs: leave-one-out leaves each query exactly one relevant item (R = 1).
    rng = np.random.default_rng(7)
    labels = np.repeat(np.arange(6), 2)
    x = unit(rng.normal(size=(6, 5))[labels] + 0.8 * rng.normal(size=(12, 5))).astype(np.float32)
    got = retrieval_metrics(x, labels, ks=(1, 3))
    want = reference_metrics(x, labels, x, labels, (1, 3), leave_one_out=True)
    assert 0 < want["map@r"] < 1
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-6), key
    # One query, evaluated alone: its MAP@R is its own AP (here 1: its pair comes first), not a share of it.
    gallery = [j for j in range(12) if j != 2]
    one = retrieval_metrics(x[2:3], labels[2:3], x[gallery], labels[gallery], ks=(1,))
    assert one["map@r"] == pytest.approx(1.0)


def test_query_label_missing_from_the_gallery():
    rng = np.random.default_rng(6)
    g = unit(rng.normal(size=(12, 5))).astype(np.float32)
    gl = np.repeat(["a", "b", "c"], 4)
    q = unit(rng.normal(size=(6, 5))).astype(np.float32)
    ql = np.array(["a", "b", "c", "a", "z", "z"])  # "z" has no relevant gallery item
    got = retrieval_metrics(q, ql, g, gl, ks=(1, 3))
    want = reference_metrics(q, ql, g, gl, (1, 3), leave_one_out=False)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key
    assert got["map_at_r_truncated"] == 0.0


@pytest.mark.parametrize("leave_one_out", [True, False])
def test_gallery_of_one_class_is_retrieved_whole(leave_one_out: bool):
    # Every gallery item is relevant: R is the whole list (less the query itself), and nothing is truncated
    # although ks asks for more items than there are.
    g = np.eye(5, dtype=np.float32) + 0.1
    labels = np.zeros(5, dtype=int)
    if leave_one_out:
        got = retrieval_metrics(g, labels, ks=(1, 10))
    else:
        got = retrieval_metrics(g[:2], labels[:2], g, labels, ks=(1, 10))
    assert got["map@r"] == pytest.approx(1.0) and got["recall@10"] == 1.0
    assert got["map_at_r_truncated"] == 0.0


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
