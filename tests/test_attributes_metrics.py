"""Attribute metrics against sklearn and slow references; threshold selection; the ROC figure."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from visuray.attributes.metrics import (
    average_precision,
    micro_roc_curve,
    multilabel_report,
    plot_roc_png,
    relative_improvement,
    roc_auc,
    roc_curve,
)
from visuray.attributes.thresholds import best_f1_threshold, select_thresholds

pytestmark = pytest.mark.unit


def _pairwise_auc(y: np.ndarray, s: np.ndarray) -> float:
    """Slow reference: share of (positive, negative) pairs ranked right, ties counting one half."""
    pos, neg = s[y == 1], s[y == 0]
    return float(np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg]))


@pytest.mark.parametrize("seed", range(5))
def test_auc_and_ap_match_sklearn_and_the_pairwise_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = (rng.random(60) < 0.3).astype(int)
    s = np.round(rng.random(60) + 0.3 * y, 1)  # rounding makes ties
    assert roc_auc(y, s) == pytest.approx(roc_auc_score(y, s))
    assert roc_auc(y, s) == pytest.approx(_pairwise_auc(y, s))
    assert average_precision(y, s) == pytest.approx(average_precision_score(y, s))
    fpr, tpr = roc_curve(y, s)
    sk_fpr, sk_tpr, _ = sk_roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)


def test_auc_is_nan_without_both_classes() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # NaN by the rule, not by a 0/0 division
        assert np.isnan(roc_auc(np.zeros(4), np.arange(4)))
        assert np.isnan(roc_auc(np.ones(4), np.arange(4)))
        assert np.isnan(average_precision(np.zeros(4), np.arange(4)))


@pytest.mark.parametrize(
    ("y", "s"),
    [
        ([0, 0, 1, 0, 1], [0.9, 0.8, 0.7, 0.6, 0.1]),  # top two negative, a positive at the lowest score
        ([1, 0, 0, 0], [0.2, 0.5, 0.6, 0.9]),  # a single positive, at the lowest score
        ([0, 1, 1, 1], [0.1, 0.3, 0.5, 0.9]),  # a single negative, at the lowest score
        ([1, 0, 1, 0], [0.5, 0.5, 0.5, 0.5]),  # one threshold only
        ([1, 0, 1, 0, 1], [True, False, False, True, True]),  # hard predictions as booleans
        ([1, 0, 0, 1], np.array([3, 0, 1, 2], dtype=np.uint8)),  # unsigned scores: no wrap-around on negation
    ],
    ids=["negatives-first", "one-positive", "one-negative", "all-tied", "bool-scores", "uint8-scores"],
)
def test_auc_ap_and_curve_edge_cases_match_sklearn(y: list[int], s: list[float] | np.ndarray) -> None:
    y_arr, s_arr = np.array(y), np.asarray(s)
    assert roc_auc(y_arr, s_arr) == pytest.approx(roc_auc_score(y_arr, s_arr))
    assert average_precision(y_arr, s_arr) == pytest.approx(average_precision_score(y_arr, s_arr))
    fpr, tpr = roc_curve(y_arr, s_arr)
    sk_fpr, sk_tpr, _ = sk_roc_curve(y_arr, s_arr.astype(np.float64), drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)


def test_report_averages_only_labels_with_enough_positives() -> None:
    rng = np.random.default_rng(0)
    n = 200
    targets = np.zeros((n, 3), dtype=np.float32)
    targets[:80, 0] = 1
    targets[:3, 1] = 1  # only 3 positives: reported as too few
    targets[50:150, 2] = 1
    scores = rng.random((n, 3)) + 0.5 * targets
    known = np.ones_like(targets, dtype=bool)
    known[150:, 2] = False  # unknown entries are not counted as negatives
    report = multilabel_report(scores, targets, known, ["a", "b", "c"], min_positives=5)
    assert [e["label"] for e in report["per_label"]] == ["a", "c"]
    assert report["too_few"] == [{"label": "b", "positives": 3, "negatives": 197}]
    auc_a = roc_auc_score(targets[:, 0], scores[:, 0])
    auc_c = roc_auc_score(targets[:150, 2], scores[:150, 2])
    assert report["macro_auc"] == pytest.approx((auc_a + auc_c) / 2)
    micro = roc_auc_score(np.r_[targets[:, 0], targets[:150, 2]], np.r_[scores[:, 0], scores[:150, 2]])
    assert report["micro_auc"] == pytest.approx(micro)
    ap = (
        average_precision_score(targets[:, 0], scores[:, 0])
        + average_precision_score(targets[:150, 2], scores[:150, 2])
    ) / 2
    assert report["map"] == pytest.approx(ap)
    assert report["per_label"][1]["negatives"] == 50


def test_report_defaults_boundaries_and_known_masks() -> None:
    rng = np.random.default_rng(1)
    n = 40
    targets = np.zeros((n, 3), dtype=np.float32)
    targets[:5, 0] = 1  # exactly the default minimum of 5 positives: evaluated
    targets[:35, 1] = 1  # exactly 5 negatives: evaluated
    targets[:4, 2] = 1  # 4 positives: too few
    scores = rng.random((n, 3)) + 0.3 * targets
    report = multilabel_report(scores, targets, None, ["a", "b", "c"])  # None: every entry known
    assert report["min_positives"] == 5 and report["num_evaluated"] == 2
    assert [e["label"] for e in report["per_label"]] == ["a", "b"]
    assert report["too_few"] == [{"label": "c", "positives": 4, "negatives": 36}]
    assert report["per_label"][0]["auc"] == pytest.approx(roc_auc_score(targets[:, 0], scores[:, 0]))
    assert report["per_label"][1]["ap"] == pytest.approx(average_precision_score(targets[:, 1], scores[:, 1]))
    # A 0/1 integer mask reads as known/unknown, like a boolean one (not as row indices 0 and 1).
    known = np.ones((n, 3), dtype=bool)
    known[30:, 0] = False
    as_bool = multilabel_report(scores, targets, known, ["a", "b", "c"], min_positives=2)
    as_int = multilabel_report(scores, targets, known.astype(np.int64), ["a", "b", "c"], min_positives=2)
    assert as_int == as_bool and as_bool["per_label"][0]["negatives"] == 25


def test_report_without_evaluable_labels_is_nan_and_quiet() -> None:
    targets = np.zeros((10, 2), dtype=np.float32)
    targets[:2] = 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "mean of empty slice" on the way to NaN
        report = multilabel_report(np.linspace(0, 1, 20).reshape(10, 2), targets, None, ["a", "b"])
        rel = relative_improvement(report, report)
    assert np.isnan(report["macro_auc"]) and np.isnan(report["micro_auc"]) and np.isnan(report["map"])
    assert report["num_evaluated"] == 0 and len(report["too_few"]) == 2
    assert np.isnan(rel["mean_relative_auc"]) and rel["labels_compared"] == 0


def test_micro_roc_curve_pools_the_known_entries_of_the_given_labels() -> None:
    rng = np.random.default_rng(2)
    targets = (rng.random((30, 3)) < 0.4).astype(np.float32)
    scores = np.round(rng.random((30, 3)) + 0.4 * targets, 1)
    known = rng.random((30, 3)) < 0.8
    fpr, tpr = micro_roc_curve(scores, targets, known, [0, 2])
    pooled_y = np.r_[targets[known[:, 0], 0], targets[known[:, 2], 2]]
    pooled_s = np.r_[scores[known[:, 0], 0], scores[known[:, 2], 2]]
    sk_fpr, sk_tpr, _ = sk_roc_curve(pooled_y, pooled_s, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)
    fpr, tpr = micro_roc_curve(scores, targets, None, [1])  # None: every entry known
    sk_fpr, sk_tpr, _ = sk_roc_curve(targets[:, 1], scores[:, 1], drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)


def test_relative_improvement_per_label() -> None:
    base = {"per_label": [{"label": "a", "auc": 0.5}, {"label": "b", "auc": 0.8}]}
    model = {
        "per_label": [{"label": "a", "auc": 0.6}, {"label": "b", "auc": 0.72}, {"label": "c", "auc": 0.9}]
    }
    rel = relative_improvement(model, base)
    assert rel["per_label"] == pytest.approx({"a": 0.2, "b": -0.1})
    assert rel["mean_relative_auc"] == pytest.approx(0.05)
    assert rel["labels_improved"] == 1 and rel["labels_compared"] == 2
    unchanged = relative_improvement(base, base)  # no change is no improvement
    assert unchanged["labels_improved"] == 0 and unchanged["mean_relative_auc"] == 0.0


def _f1(y: np.ndarray, predicted: np.ndarray) -> float:
    tp = (predicted & y).sum()
    return 2 * tp / max(predicted.sum() + y.sum(), 1)


@pytest.mark.parametrize("seed", range(4))
def test_threshold_maximises_f1_against_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = rng.random(50) < 0.3
    s = np.round(rng.random(50) * 0.7 + 0.3 * y, 2)
    threshold, f1 = best_f1_threshold(y, s)
    brute = max(_f1(y, s >= t) for t in np.unique(s))
    assert f1 == pytest.approx(brute)
    assert _f1(y, s >= threshold) == pytest.approx(brute)


def test_select_thresholds_per_label_with_default_for_no_positives() -> None:
    scores = np.array([[0.9, 0.2], [0.8, 0.1], [0.3, 0.7], [0.1, 0.4]])
    targets = np.array([[1, 0], [1, 0], [0, 0], [0, 0]], dtype=np.float32)
    thresholds = select_thresholds(scores, targets, default=0.5)
    assert thresholds[0] == pytest.approx(0.55)  # halfway between 0.8 (last positive) and 0.3
    assert thresholds[1] == 0.5  # no validation positive: the default stays


def test_roc_png_is_written(tmp_path: Path) -> None:
    y = np.array([0, 1, 0, 1, 1, 0])
    s = np.array([0.1, 0.9, 0.4, 0.6, 0.3, 0.2])
    fpr, tpr = roc_curve(y, s)
    path = plot_roc_png(tmp_path / "roc.png", {"model": (fpr, tpr, roc_auc(y, s))}, "t", {"a": (fpr, tpr)})
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
