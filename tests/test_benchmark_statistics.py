"""The statistics the benchmarks report, against slow reference implementations.

The benchmarks are scripts, not a package: they are loaded from their files.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load_benchmark(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there while the class is built
    spec.loader.exec_module(module)
    return module


def reference_cluster_bootstrap(
    diff: np.ndarray, clusters: list[str], n_boot: int, seed: int
) -> tuple[float, float]:
    """One resample at a time: draw reference items with replacement, take every query of each draw."""
    names = sorted(set(clusters))
    members = {name: [i for i, c in enumerate(clusters) if c == name] for name in names}
    rng = np.random.default_rng(seed)
    means = []
    for _ in range(n_boot):
        drawn = rng.integers(0, len(names), len(names))
        queries = [i for d in drawn for i in members[names[d]]]
        means.append(float(np.mean(diff[queries])))
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


@pytest.mark.unit
def test_paired_margins_equal_a_query_by_query_cluster_bootstrap() -> None:
    fq = load_benchmark("fusion_quality")
    rng = np.random.default_rng(3)
    # 40 reference images with 1-4 queries each; the fusion row ranks the target better on average.
    clusters = [f"ref-{r}" for r in range(40) for _ in range(int(rng.integers(1, 5)))]
    n = len(clusters)
    ranks = {
        "maaf": rng.integers(0, 30, n),
        "tirg": rng.integers(0, 60, n),
        "not-a-row": rng.integers(0, 9, n),
    }
    (row,) = fq.paired_margins(ranks, clusters, ks=(1, 10, 50), n_boot=300, seed=7)
    assert (row["model"], row["over"]) == ("maaf", "tirg")
    for k in (1, 10, 50):
        diff = (ranks["maaf"] < k).astype(float) - (ranks["tirg"] < k)
        assert row[f"R@{k}"]["margin"] == pytest.approx(diff.mean())
        assert row[f"R@{k}"]["ci95"] == pytest.approx(reference_cluster_bootstrap(diff, clusters, 300, 7))
    both = (
        (ranks["maaf"] < 10).astype(float)
        - (ranks["tirg"] < 10)
        + (ranks["maaf"] < 50)
        - (ranks["tirg"] < 50)
    ) / 2
    assert row["(R@10+R@50)/2"]["ci95"] == pytest.approx(reference_cluster_bootstrap(both, clusters, 300, 7))
    lo, hi = row["R@10"]["ci95"]
    assert lo < row["R@10"]["margin"] < hi and hi - lo > 0.01  # an interval, not a point


@pytest.mark.unit
def test_a_bootstrap_over_queries_of_one_cluster_each_is_the_plain_bootstrap() -> None:
    """With one query per reference image the cluster bootstrap is the ordinary one, so its interval
    narrows like 1/sqrt(n): four times the queries, about half the width."""
    fq = load_benchmark("fusion_quality")
    rng = np.random.default_rng(0)
    widths = []
    for n in (200, 800):
        ranks = {"residual": rng.integers(0, 20, n), "concat": rng.integers(0, 40, n)}
        (row,) = fq.paired_margins(ranks, [str(i) for i in range(n)], ks=(10,), n_boot=2000, seed=1)
        lo, hi = row["R@10"]["ci95"]
        widths.append(hi - lo)
    assert 0.35 < widths[1] / widths[0] < 0.65


def reference_per_query(
    sim: np.ndarray, query_labels: list[int], gallery_labels: list[int], leave_one_out: bool
) -> tuple[list[float], list[float]]:
    """One query at a time: rank the gallery by score (ties by position), skip the query itself in
    leave-one-out, then hit@1 and AP@R = 1/R * sum over the top R of precision@i where item i is relevant."""
    hits, aps = [], []
    for q, label in enumerate(query_labels):
        ranked = sorted(range(len(gallery_labels)), key=lambda g: (-sim[q, g], g))
        ranked = [g for g in ranked if not (leave_one_out and g == q)]
        relevant = [gallery_labels[g] == label for g in ranked]
        r = sum(relevant)
        hits.append(float(relevant[0]))
        if r == 0:
            aps.append(float("nan"))
            continue
        found, total = 0, 0.0
        for i in range(r):
            if relevant[i]:
                found += 1
                total += found / (i + 1)
        aps.append(total / r)
    return hits, aps


@pytest.mark.unit
@pytest.mark.parametrize("leave_one_out", [True, False])
def test_per_query_retrieval_metrics_equal_a_query_by_query_loop(leave_one_out: bool) -> None:
    fq = load_benchmark("finetune_quality")
    rng = np.random.default_rng(5)
    # Few distinct vectors (rounded) so that ties occur, and a label no gallery item has (no R).
    query = np.round(rng.normal(size=(30, 4)), 0).astype(np.float32)
    query_labels = [int(x) for x in rng.integers(0, 4, 30)]
    if leave_one_out:
        query_labels[0] = 9  # alone: no relevant item once it is left out
        gallery, gallery_labels = None, None
        sim, ref_gallery_labels = query @ query.T, query_labels
    else:
        gallery = np.round(rng.normal(size=(25, 4)), 0).astype(np.float32)
        gallery_labels = [int(x) for x in rng.integers(0, 3, 25)]
        query_labels[0] = 7
        sim, ref_gallery_labels = query @ gallery.T, gallery_labels
    got = fq.per_query_metrics(query, query_labels, gallery, gallery_labels)
    hits, aps = reference_per_query(sim, query_labels, ref_gallery_labels, leave_one_out)
    np.testing.assert_array_equal(got["hit@1"], hits)
    np.testing.assert_allclose(got["ap@r"], aps, equal_nan=True)
    assert np.isnan(got["ap@r"][0]) and np.isfinite(got["ap@r"]).sum() > 15
    assert len(np.unique(sim)) < sim.size / 3  # the example does have ties


@pytest.mark.unit
def test_per_query_means_equal_retrieval_metrics_without_ties() -> None:
    from visuray.evaluation.retrieval import retrieval_metrics

    fq = load_benchmark("finetune_quality")
    rng = np.random.default_rng(2)
    vectors = rng.normal(size=(200, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    labels = [int(x) for x in rng.integers(0, 6, 200)]
    for gallery, gallery_labels in [(None, None), (vectors[:120], labels[:120])]:
        query, query_labels = (vectors, labels) if gallery is None else (vectors[120:], labels[120:])
        library = retrieval_metrics(query, query_labels, gallery, gallery_labels, ks=(1,))
        per_query = fq.per_query_metrics(query, query_labels, gallery, gallery_labels)
        assert fq.check_against_library(per_query, library, "test") < 1e-9


@pytest.mark.unit
def test_paired_margin_is_a_bootstrap_over_queries_with_one_resample_for_both_rows() -> None:
    fq = load_benchmark("finetune_quality")
    rng = np.random.default_rng(4)
    a, b = rng.random(60), rng.random(60) - 0.1
    b[3] = np.nan  # an undefined query (no R) is left out of both rows
    counts = fq.bootstrap_counts(60, n_boot=500, seed=11)
    got = fq.paired_margin(a, b, counts)
    valid = ~np.isnan(b)
    assert got["margin"] == pytest.approx(np.mean(a[valid] - b[valid]))
    draws = np.random.default_rng(11)
    boot = []
    for _ in range(500):
        drawn = [int(i) for i in draws.integers(0, 60, 60) if valid[i]]
        boot.append(np.mean(a[drawn]) - np.mean(b[drawn]))
    assert got["ci95"] == pytest.approx(list(np.percentile(boot, [2.5, 97.5])))


@pytest.mark.unit
def test_seed_margins_average_each_query_over_seeds_before_the_paired_bootstrap(tmp_path: Path) -> None:
    sm = load_benchmark("seed_margins")
    rng = np.random.default_rng(5)
    n = 60
    ap_nan = rng.random(n) < 0.1  # queries with no relevant item: NaN AP@R in every row alike

    def row(p_hit: float) -> dict[str, np.ndarray]:
        ap = np.where(ap_nan, np.nan, rng.random(n))
        return {"hit@1": (rng.random(n) < p_hit).astype(float), "ap@r": ap}

    seeds = [{"new": row(0.7), "old": row(0.5)}, {"new": row(0.6), "old": row(0.5)}]
    baseline = row(0.4)
    files = []
    for i, rows in enumerate(seeds):
        if i == 0:
            rows = rows | {"pixels": baseline}  # an untrained row lives in the seed-0 file only
        arrays = {f"(a) {name} {key}": v for name, d in rows.items() for key, v in d.items()}
        files.append(str(tmp_path / f"seed{i}.npz"))
        np.savez(files[-1], **arrays)

    margins = sm.main([*files, "--pair", "(a) new", "(a) old", "--pair", "(a) new", "(a) pixels"])

    counts = sm.bootstrap_counts(n)
    for m, other in zip(margins, ([s["old"] for s in seeds], [baseline, baseline]), strict=True):
        assert m["seeds"] == ((2, 2) if other[0] is not baseline else (2, 1))
        for metric, key in (("Recall@1", "hit@1"), ("MAP@R", "ap@r")):
            mine = (seeds[0]["new"][key] + seeds[1]["new"][key]) / 2
            diff = mine - (other[0][key] + other[1][key]) / 2
            valid = ~np.isnan(diff)
            assert m[metric]["margin"] == pytest.approx(diff[valid].mean())
            # Slow reference: one resample at a time, the mean of the drawn queries' differences.
            boot = [np.sum(c[valid] * diff[valid]) / np.sum(c[valid]) for c in counts]
            assert m[metric]["ci95"] == pytest.approx(list(np.percentile(boot, [2.5, 97.5])))
            per_seed = [np.nanmean(seeds[i]["new"][key] - other[i][key]) for i in range(2)]
            assert m[f"{metric} per seed"] == pytest.approx(per_seed)


@pytest.mark.unit
def test_seed_margins_refuse_an_unknown_row_and_files_of_other_query_sets(tmp_path: Path) -> None:
    sm = load_benchmark("seed_margins")
    np.savez(tmp_path / "a.npz", **{"x hit@1": np.ones(3), "x ap@r": np.ones(3)})
    np.savez(tmp_path / "b.npz", **{"x hit@1": np.ones(4), "x ap@r": np.ones(4)})
    with pytest.raises(SystemExit, match="no row 'y'.*rows: \\['x'\\]"):
        sm.main([str(tmp_path / "a.npz"), "--pair", "x", "y"])
    with pytest.raises(SystemExit, match="different query sets"):
        sm.main([str(tmp_path / "a.npz"), str(tmp_path / "b.npz"), "--pair", "x", "x"])
    # Rows of other sizes in the same file (another task) are no obstacle to a pair of equal sizes.
    np.savez(tmp_path / "c.npz", **{"x hit@1": np.ones(3), "x ap@r": np.ones(3), "z hit@1": np.ones(4)})
    (margin,) = sm.main([str(tmp_path / "c.npz"), "--pair", "x", "x"])
    assert margin["Recall@1"]["margin"] == 0.0


@pytest.mark.unit
def test_resampled_attribute_aucs_equal_roc_auc_on_materialised_resamples() -> None:
    from visuray.attributes.metrics import roc_auc

    aq = load_benchmark("attributes_quality")
    rng = np.random.default_rng(11)
    n, labels = 50, [0, 2]
    scores = np.round(rng.random((n, 3)), 1)  # rounded: ties between products, which count one half
    targets = (rng.random((n, 3)) < 0.4).astype(np.float32)
    known = rng.random((n, 3)) < 0.8  # unknown labels are left out of that label's AUC
    counts = aq.bootstrap_counts(n, n_boot=20, seed=4)
    aucs = aq.resampled_aucs(scores, targets, known, labels, counts)
    assert aucs.shape == (21, 2)
    for r, weights in enumerate([np.ones(n, dtype=np.int64), *counts]):
        for k, j in enumerate(labels):
            rows = np.repeat(np.flatnonzero(known[:, j]), weights[known[:, j]])
            expected = roc_auc(targets[rows, j], scores[rows, j])
            assert aucs[r, k] == pytest.approx(expected, nan_ok=True)
