"""Multi-label evaluation: per-label ROC AUC and average precision, macro and micro AUC, mAP, ROC plots.

AUC is the Mann-Whitney statistic (the probability that a random positive outscores a random negative,
ties counting one half), computed from average ranks, so it matches ``sklearn.metrics.roc_auc_score``.
Average precision is sklearn's step-wise definition, ``sum_n (R_n - R_{n-1}) P_n`` over distinct score
thresholds.

A label is *evaluated* only when its known entries hold at least ``min_positives`` positives and as many
negatives; others are listed under ``too_few`` with their counts and left out of every average (an AUC
from two positives is noise, and a silent average over it would hide that).
Macro AUC and mAP are unweighted means over evaluated labels; micro AUC pools every known entry of the
evaluated labels into one ranking.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks with ties sharing their average rank."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    ranks = np.empty(len(values), dtype=np.float64)
    boundaries = np.flatnonzero(np.diff(sorted_values)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(values)]])
    for start, end in zip(starts, ends, strict=True):
        ranks[order[start:end]] = 0.5 * (start + end + 1)
    return ranks


def roc_auc(targets: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve of one label; NaN when either class is absent."""
    targets = np.asarray(targets).astype(bool)
    positives, negatives = int(targets.sum()), int((~targets).sum())
    if positives == 0 or negatives == 0:
        return float("nan")
    ranks = _average_ranks(np.asarray(scores, dtype=np.float64))
    return float((ranks[targets].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def _descending_counts(targets: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """True and false positives at every distinct threshold, highest first, and those thresholds."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="mergesort")
    s, y = np.asarray(scores, dtype=np.float64)[order], np.asarray(targets).astype(bool)[order]
    last_of_value = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tps = np.cumsum(y)[last_of_value]
    fps = (last_of_value + 1) - tps
    return tps.astype(np.float64), fps.astype(np.float64), s[last_of_value]


def roc_curve(targets: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr), starting at (0, 0), one point per distinct score."""
    tps, fps, _ = _descending_counts(targets, scores)
    tpr = np.r_[0.0, tps / max(tps[-1], 1.0)]
    fpr = np.r_[0.0, fps / max(fps[-1], 1.0)]
    return fpr, tpr


def average_precision(targets: np.ndarray, scores: np.ndarray) -> float:
    """Average precision of one label (sklearn's definition); NaN without positives."""
    tps, fps, _ = _descending_counts(targets, scores)
    if tps[-1] == 0:
        return float("nan")
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def multilabel_report(
    scores: np.ndarray,
    targets: np.ndarray,
    known: np.ndarray | None,
    label_names: Sequence[str],
    min_positives: int = 5,
) -> dict[str, Any]:
    """Per-label AUC/AP and the averages over labels with enough positives and negatives (see module doc)."""
    scores, targets = np.asarray(scores, dtype=np.float64), np.asarray(targets)
    known = np.ones_like(targets, dtype=bool) if known is None else np.asarray(known, dtype=bool)
    per_label: list[dict[str, Any]] = []
    too_few: list[dict[str, Any]] = []
    pooled_scores, pooled_targets = [], []
    for j, name in enumerate(label_names):
        rows = known[:, j]
        y, s = targets[rows, j] > 0.5, scores[rows, j]
        positives, negatives = int(y.sum()), int((~y).sum())
        entry = {"label": name, "positives": positives, "negatives": negatives}
        if positives < min_positives or negatives < min_positives:
            too_few.append(entry)
            continue
        entry.update(auc=roc_auc(y, s), ap=average_precision(y, s))
        per_label.append(entry)
        pooled_scores.append(s)
        pooled_targets.append(y)
    evaluated = bool(per_label)
    return {
        "macro_auc": float(np.mean([e["auc"] for e in per_label])) if evaluated else float("nan"),
        "micro_auc": roc_auc(np.concatenate(pooled_targets), np.concatenate(pooled_scores))
        if evaluated
        else float("nan"),
        "map": float(np.mean([e["ap"] for e in per_label])) if evaluated else float("nan"),
        "num_evaluated": len(per_label),
        "min_positives": min_positives,
        "per_label": per_label,
        "too_few": too_few,
    }


def micro_roc_curve(
    scores: np.ndarray, targets: np.ndarray, known: np.ndarray | None, labels: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """The pooled ROC curve over the known entries of the label columns ``labels``."""
    known = np.ones_like(targets, dtype=bool) if known is None else known
    y = np.concatenate([targets[known[:, j], j] for j in labels]) > 0.5
    s = np.concatenate([scores[known[:, j], j] for j in labels])
    return roc_curve(y, s)


def plot_roc_png(
    path: str | Path,
    curves: Mapping[str, tuple[np.ndarray, np.ndarray, float]],
    title: str,
    label_curves: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
) -> Path:
    """Write a ROC figure: one line per entry of ``curves`` (name -> fpr, tpr, auc), and optionally the
    per-label curves of one model as thin grey lines behind them."""
    import matplotlib

    matplotlib.use("Agg")  # no display on workers and CI
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5), dpi=110)
    for fpr, tpr in (label_curves or {}).values():
        ax.plot(fpr, tpr, color="0.8", linewidth=0.6)
    for name, (fpr, tpr, auc) in curves.items():
        ax.plot(fpr, tpr, linewidth=1.8, label=f"{name} (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], linestyle="--", color="0.5", linewidth=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title, xlim=(0, 1), ylim=(0, 1))
    if label_curves:
        ax.plot([], [], color="0.8", linewidth=0.6, label=f"per label ({len(label_curves)})")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def relative_improvement(model: Mapping[str, Any], baseline: Mapping[str, Any]) -> dict[str, Any]:
    """Per-label relative AUC change of ``model`` over ``baseline`` (reports from :func:`multilabel_report`)
    on the labels both evaluated, and its mean: the "mean relative AUC improvement" of the literature."""
    base = {e["label"]: e["auc"] for e in baseline["per_label"]}
    per_label = {
        e["label"]: (e["auc"] - base[e["label"]]) / base[e["label"]]
        for e in model["per_label"]
        if e["label"] in base
    }
    values = list(per_label.values())
    return {
        "mean_relative_auc": float(np.mean(values)) if values else float("nan"),
        "labels_improved": int(sum(v > 0 for v in values)),
        "labels_compared": len(values),
        "per_label": per_label,
    }
