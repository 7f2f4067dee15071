"""The statistics the benchmarks report, against slow reference implementations.

The benchmarks are scripts, not a package: they are loaded from their files.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load_benchmark(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
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
