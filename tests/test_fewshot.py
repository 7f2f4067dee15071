"""k-NN, few-shot and held-out retrieval evaluations on synthetic embeddings, against slow references."""

from __future__ import annotations

import time
from collections import defaultdict

import numpy as np
import pytest

from visuray.evaluation.fewshot import (
    fewshot_accuracy,
    logistic_regression_accuracies,
    mean_ci95,
    prototype_accuracies,
    sample_episodes,
)
from visuray.evaluation.knn import knn_accuracy, knn_predict_scores, stratified_item_split
from visuray.evaluation.ssl_eval import SSLEvalOptions, evaluate_embeddings, heldout_classes

pytestmark = pytest.mark.unit


def clustered(num_classes: int, per_class: int, dim: int = 16, noise: float = 0.6, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_classes, dim))
    labels = np.repeat(np.arange(num_classes), per_class)
    vectors = centres[labels] + noise * rng.normal(size=(len(labels), dim))
    return vectors.astype(np.float32), [f"class{c}" for c in labels]


def unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_weighted_knn_matches_slow_reference():
    vectors, labels = clustered(4, 12, noise=1.5)
    train, test = stratified_item_split(labels, 0.5, seed=0)
    labels_arr = np.array(labels)
    votes, classes = knn_predict_scores(
        vectors[train], labels_arr[train], vectors[test], k=5, temperature=0.07
    )
    tr, te = unit(vectors[train]), unit(vectors[test])
    for row, query in enumerate(te):
        sims = [(float(query @ t), i) for i, t in enumerate(tr)]
        sims.sort(key=lambda s: -s[0])
        expected = defaultdict(float)
        for sim, i in sims[:5]:
            expected[labels_arr[train][i]] += np.exp(sim / 0.07)
        for column, name in enumerate(classes):
            assert votes[row, column] == pytest.approx(expected.get(name, 0.0), rel=1e-4)
    metrics = knn_accuracy(vectors[train], labels_arr[train], vectors[test], labels_arr[test], k=5)
    predicted = np.array(classes)[votes.argmax(1)]
    assert metrics["knn/top1"] == pytest.approx(float((predicted == labels_arr[test]).mean()))


def test_item_split_is_stratified_and_disjoint():
    labels = ["a"] * 10 + ["b"] * 4 + ["c"]
    train, test = stratified_item_split(labels, 0.5, seed=3)
    assert not set(train) & set(test) and len(train) + len(test) == len(labels)
    labels_arr = np.array(labels)
    assert sorted(labels_arr[test]).count("a") == 5 and list(labels_arr[test]).count("b") == 2
    assert "c" in set(labels_arr[train]) and "c" not in set(labels_arr[test])


def test_episodes_are_well_formed():
    _, labels = clustered(8, 10)
    eps = sample_episodes(labels, n_way=5, k_shot=2, n_query=3, episodes=50, seed=1)
    assert eps.support.shape == (50, 5, 2) and eps.query.shape == (50, 5, 3)
    labels_arr = np.array(labels)
    for e in range(50):
        assert len(set(eps.classes[e])) == 5
        for n in range(5):
            items = np.concatenate([eps.support[e, n], eps.query[e, n]])
            assert len(set(items)) == 5  # no item both support and query
            assert len(set(labels_arr[items])) == 1
    with pytest.raises(ValueError, match="only 0 qualify"):
        sample_episodes(labels, 5, 5, 10, 1)


def test_prototype_head_matches_slow_reference():
    vectors, labels = clustered(6, 10, noise=1.2)
    eps = sample_episodes(labels, n_way=3, k_shot=2, n_query=4, episodes=20, seed=2)
    fast = prototype_accuracies(vectors, eps)
    normed = unit(vectors)
    for e in range(20):
        protos = unit(np.stack([normed[eps.support[e, n]].mean(0) for n in range(3)]))
        correct = sum(int(np.argmax(protos @ normed[q]) == n) for n in range(3) for q in eps.query[e, n])
        assert fast[e] == pytest.approx(correct / 12)


def test_logistic_regression_head_separates_clusters_and_ci():
    easy, labels = clustered(10, 20, noise=0.2)
    eps = sample_episodes(labels, 5, 5, 15, episodes=40, seed=0)
    assert logistic_regression_accuracies(easy, eps).mean() > 0.95
    hard, labels = clustered(10, 20, noise=3.0)
    assert logistic_regression_accuracies(hard, eps).mean() < 0.9  # noise costs accuracy: not a constant
    mean, ci = mean_ci95(np.array([0.5, 0.7, 0.6, 0.8]))
    assert mean == pytest.approx(0.65) and ci == pytest.approx(
        1.96 * np.std([0.5, 0.7, 0.6, 0.8], ddof=1) / 2
    )


def test_600_episodes_take_seconds():
    vectors, labels = clustered(20, 30, dim=64, noise=2.5)
    started = time.perf_counter()
    out = fewshot_accuracy(vectors, labels, n_way=5, shots=(1, 5), n_query=15, episodes=600)
    elapsed = time.perf_counter() - started
    assert elapsed < 30, f"600 episodes x 2 shots x 2 heads took {elapsed:.1f}s"
    for shot in (1, 5):
        for head in ("prototype", "logreg"):
            key = f"fewshot/5way{shot}shot/{head}"
            assert 0.2 < out[key] <= 1.0 and 0 < out[f"{key}_ci95"] < 0.05
    assert out["fewshot/5way5shot/prototype"] > out["fewshot/5way1shot/prototype"]


def test_evaluate_embeddings_all_tasks_on_heldout_classes():
    vectors, labels = clustered(10, 24, noise=0.8)
    opts = SSLEvalOptions(episodes=100, n_query=10, holdout_fraction=0.5)
    out = evaluate_embeddings(vectors, labels, ("knn", "fewshot", "zeroshot"), opts)
    held = out["eval/heldout_classes"]
    assert held == heldout_classes(labels, 0.5, 0) and len(held) == 5
    assert out["eval/zeroshot/num_queries"] == 5 * 24  # only the held-out classes' items
    assert out["eval/knn/top1"] > 0.8 and out["eval/zeroshot/recall@1"] > 0.8
    assert "eval/fewshot/5way1shot/logreg_ci95" in out
    noise = np.random.default_rng(0).normal(size=vectors.shape).astype(np.float32)
    chance = evaluate_embeddings(noise, labels, ("knn",), opts)
    assert chance["eval/knn/top1"] < 0.35
    with pytest.raises(ValueError, match="unknown task"):
        evaluate_embeddings(vectors, labels, ("linear",), opts)
