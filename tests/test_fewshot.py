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
from visuray.evaluation.knn import knn_accuracy, knn_predict_scores, l2_normalise, stratified_item_split
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


def _reference_ranks(
    train, train_labels, test, k: int, temperature: float
) -> tuple[list[list[str]], list[str]]:
    """Per test item, every class ranked by weighted vote (ties in sorted class order), by plain loops."""
    classes = sorted(set(train_labels))
    tr, te = unit(train.astype(np.float64)), unit(test.astype(np.float64))
    ranked = []
    for query in te:
        sims = sorted(((float(query @ t), i) for i, t in enumerate(tr)), key=lambda s: -s[0])
        votes = defaultdict(float)
        for sim, i in sims[:k]:
            votes[train_labels[i]] += np.exp(sim / temperature)
        ranked.append(sorted(classes, key=lambda c: (-votes[c], classes.index(c))))
    return ranked, classes


def test_knn_defaults_top5_and_reported_settings_match_slow_reference():
    # Many close classes, so that top-5 differs from top-1 and from 1, and some truth ranks exactly 6th.
    vectors, labels = clustered(12, 10, noise=2.0, seed=4)
    train, test = stratified_item_split(labels, 0.5, seed=0)
    labels_arr = np.array(labels)
    metrics = knn_accuracy(vectors[train], labels_arr[train], vectors[test], labels_arr[test])
    ranked, _ = _reference_ranks(
        vectors[train], list(labels_arr[train]), vectors[test], k=20, temperature=0.07
    )
    rank_of_truth = [r.index(truth) for r, truth in zip(ranked, labels_arr[test], strict=True)]
    assert 5 in rank_of_truth  # a top-6 list would score differently
    top1 = np.mean([r == 0 for r in rank_of_truth])
    top5 = np.mean([r < 5 for r in rank_of_truth])
    assert 0 < top1 < top5 < 1
    assert metrics == pytest.approx(
        {
            "knn/top1": top1,
            "knn/top5": top5,
            "knn/k": 20.0,  # DINO's k and temperature are the defaults
            "knn/temperature": 0.07,
            "knn/num_train": float(len(train)),
            "knn/num_test": float(len(test)),
        }
    )
    votes, classes = knn_predict_scores(vectors[train], labels_arr[train], vectors[test])
    assert [list(np.array(classes)[np.argsort(-row, kind="stable")]) for row in votes] == ranked


def test_knn_top5_breaks_vote_ties_in_class_order():
    # One neighbour: one class gets a vote, the 39 others tie at zero; top-5 takes the first 4 of those by
    # class order, so the same items always count as hits (an unstable sort would pick any 4).
    rng = np.random.default_rng(0)
    train = rng.normal(size=(40, 8)).astype(np.float32)
    train_labels = [f"c{i:02d}" for i in range(40)]
    test = train[30:] + 0.01
    # Each query's own class is voted; then c00, c01, c02, c03 fill the top 5, and c04 is 6th.
    metrics = knn_accuracy(train, train_labels, test, ["c03"] * 10, k=1)
    assert metrics["knn/top1"] == 0.0 and metrics["knn/top5"] == 1.0
    assert knn_accuracy(train, train_labels, test, ["c04"] * 10, k=1)["knn/top5"] == 0.0


def test_knn_without_test_items_scores_zero():
    vectors, labels = clustered(3, 4)
    metrics = knn_accuracy(vectors, labels, vectors[:0], [], k=3)
    assert metrics["knn/top1"] == 0.0 and metrics["knn/top5"] == 0.0 and metrics["knn/num_test"] == 0.0


def test_float64_and_tiny_features_are_normalised_to_unit_float32():
    vectors, labels = clustered(6, 10, noise=1.2)
    tiny = vectors * 1e-4  # norms far below 1: the 1e-12 floor must not bite
    for features in (vectors.astype(np.float64), tiny):
        normed = l2_normalise(features)
        assert normed.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(normed, axis=1), 1.0, rtol=1e-5)
    assert np.all(l2_normalise(np.zeros((2, 3))) == 0)  # a zero vector stays zero, not NaN
    eps = sample_episodes(labels, n_way=3, k_shot=2, n_query=4, episodes=20, seed=2)
    expected = logistic_regression_accuracies(vectors, eps)
    np.testing.assert_array_equal(logistic_regression_accuracies(vectors.astype(np.float64), eps), expected)


def test_item_split_defaults_bounds_and_small_classes():
    labels = ["a"] * 10 + ["b"] * 2 + ["c"] * 3 + ["d"]
    train, test = stratified_item_split(labels)
    expected_train, expected_test = stratified_item_split(labels, 0.5, seed=0)
    np.testing.assert_array_equal(train, expected_train)
    np.testing.assert_array_equal(test, expected_test)
    assert [list(np.array(labels)[test]).count(c) for c in "abcd"] == [5, 1, 2, 0]
    # A high fraction still leaves one item of every class in train, also for a class of one.
    train, test = stratified_item_split(labels, 0.9, seed=1)
    assert set(np.array(labels)[train]) == set("abcd") and len(test) == 9 + 1 + 2
    # Everything is a function of the seed.
    for seed in (0, 1):
        first, second = (
            stratified_item_split(labels, 0.5, seed=seed),
            stratified_item_split(labels, 0.5, seed=seed),
        )
        np.testing.assert_array_equal(first[1], second[1])
    # Index arrays stay integer when empty (singletons only: nothing goes to test).
    train, test = stratified_item_split(["a", "b", "c"], 0.5)
    assert test.dtype == np.int64 and train.dtype == np.int64 and len(test) == 0
    empty_train, _ = stratified_item_split([], 0.5)
    assert empty_train.dtype == np.int64
    for fraction in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match=rf"test_fraction must lie in \(0, 1\), got {fraction}"):
            stratified_item_split(labels, fraction)


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


def _reference_logreg(features, episodes, l2: float, iterations: int, scale: float, lr: float) -> np.ndarray:
    """One episode at a time: Adam on the mean cross-entropy plus the L2 term, from zero weights."""
    import torch
    from torch.nn import functional as F

    feats = torch.from_numpy(unit(features).astype(np.float32))
    e, n, k = episodes.support.shape
    accuracies = []
    for i in range(e):
        x = feats[torch.from_numpy(episodes.support[i].reshape(-1))] * scale
        y = torch.arange(n).repeat_interleave(k)
        weight = torch.zeros(feats.shape[1], n, requires_grad=True)
        bias = torch.zeros(n, requires_grad=True)
        optimizer = torch.optim.Adam([weight, bias], lr=lr)
        for _ in range(iterations):
            loss = F.cross_entropy(x @ weight + bias, y) + l2 * weight.pow(2).sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        query = feats[torch.from_numpy(episodes.query[i].reshape(-1))] * scale
        truth = torch.arange(n).repeat_interleave(episodes.query.shape[2])
        with torch.no_grad():
            accuracies.append(float(((query @ weight + bias).argmax(-1) == truth).float().mean()))
    return np.array(accuracies)


@pytest.mark.parametrize("k_shot", [1, 3])
def test_logistic_regression_head_matches_per_episode_reference(k_shot: int):
    # Overlapping clusters, so that the predictions depend on the fitted weights, not only on the data.
    vectors, labels = clustered(8, 12, dim=8, noise=2.0, seed=k_shot)
    eps = sample_episodes(labels, n_way=4, k_shot=k_shot, n_query=6, episodes=12, seed=k_shot)
    fast = logistic_regression_accuracies(vectors, eps)  # the defaults: l2 1e-3, 100 steps, scale 10
    slow = _reference_logreg(vectors, eps, l2=1e-3, iterations=100, scale=10.0, lr=0.1)
    np.testing.assert_allclose(fast, slow, atol=1e-6)
    assert 0.2 < fast.mean() < 0.95  # neither chance nor trivially separable


def test_mean_ci95_of_fewer_than_two_values_and_episode_seed_default():
    assert mean_ci95(np.array([0.25]))[0] == 0.25 and np.isnan(mean_ci95(np.array([0.25]))[1])
    mean, ci = mean_ci95(np.array([]))
    assert mean == 0.0 and np.isnan(ci)
    assert mean_ci95(np.array([0.5, 0.7])) == pytest.approx(
        (0.6, 1.96 * np.std([0.5, 0.7], ddof=1) / np.sqrt(2))
    )
    # Per-episode accuracies arrive as float32; the interval is computed in float64 all the same.
    accuracies = np.random.default_rng(0).random(600).astype(np.float32)
    as_float64 = accuracies.astype(np.float64)
    assert mean_ci95(accuracies) == (
        float(as_float64.mean()),
        float(1.96 * as_float64.std(ddof=1) / np.sqrt(600)),
    )
    _, labels = clustered(6, 8)
    default = sample_episodes(labels, n_way=3, k_shot=2, n_query=3, episodes=5)
    seeded = sample_episodes(labels, n_way=3, k_shot=2, n_query=3, episodes=5, seed=0)
    np.testing.assert_array_equal(default.support, seeded.support)
    np.testing.assert_array_equal(default.query, seeded.query)
    with pytest.raises(
        ValueError, match=r"^unknown few-shot head\(s\) \['knn'\]; choose from \['logreg', 'prototype'\]$"
    ):
        fewshot_accuracy(*clustered(6, 8), heads=("prototype", "knn"))
    with pytest.raises(
        ValueError, match=r"^3-way 2-shot with 7 queries needs 3 classes of at least 9 items; only 0 qualify$"
    ):
        sample_episodes(labels, n_way=3, k_shot=2, n_query=7, episodes=1)
    with pytest.raises(ValueError, match="only 0 qualify"):
        sample_episodes([], n_way=2, k_shot=1, n_query=1, episodes=1)  # no items at all


def test_600_episodes_take_seconds():
    vectors, labels = clustered(20, 30, dim=64, noise=2.5)
    started = time.perf_counter()
    out = fewshot_accuracy(vectors, labels)  # the defaults: 5-way 1- and 5-shot, 15 queries, 600 episodes
    elapsed = time.perf_counter() - started
    assert elapsed < 30, f"600 episodes x 2 shots x 2 heads took {elapsed:.1f}s"
    assert out["fewshot/episodes"] == 600.0 and out["fewshot/queries_per_class"] == 15.0
    assert len(out) == 2 * 2 * 2 + 2
    # Both heads see the same episodes, drawn with seed + shots (seed 0 by default).
    episodes = sample_episodes(labels, n_way=5, k_shot=5, n_query=15, episodes=600, seed=5)
    assert out["fewshot/5way5shot/prototype"] == pytest.approx(prototype_accuracies(vectors, episodes).mean())
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
