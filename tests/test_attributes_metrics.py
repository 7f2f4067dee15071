"""Attribute metrics against sklearn and slow references; threshold selection; the ROC figure."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from visuray.attributes.metrics import (
    average_precision,
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
    assert np.isnan(roc_auc(np.zeros(4), np.arange(4)))
    assert np.isnan(average_precision(np.zeros(4), np.arange(4)))


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


def test_relative_improvement_per_label() -> None:
    base = {"per_label": [{"label": "a", "auc": 0.5}, {"label": "b", "auc": 0.8}]}
    model = {
        "per_label": [{"label": "a", "auc": 0.6}, {"label": "b", "auc": 0.72}, {"label": "c", "auc": 0.9}]
    }
    rel = relative_improvement(model, base)
    assert rel["per_label"] == pytest.approx({"a": 0.2, "b": -0.1})
    assert rel["mean_relative_auc"] == pytest.approx(0.05)
    assert rel["labels_improved"] == 1 and rel["labels_compared"] == 2


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
