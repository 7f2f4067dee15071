"""Per-label decision thresholds chosen on validation data.

For each label, the threshold maximises F1 over the known validation entries; the candidates are the
midpoints between consecutive distinct scores (and the ends), so the choice does not depend on a grid.
A label without validation positives keeps ``default`` (no evidence to move it).
"""

from __future__ import annotations

import numpy as np


def best_f1_threshold(targets: np.ndarray, scores: np.ndarray, default: float = 0.5) -> tuple[float, float]:
    """``(threshold, f1)`` maximising F1 when predicting ``score >= threshold``."""
    y = np.asarray(targets) > 0.5
    s = np.asarray(scores, dtype=np.float64)
    if y.sum() == 0:
        return default, float("nan")
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    last_of_value = np.r_[np.flatnonzero(np.diff(s_sorted)), len(s_sorted) - 1]
    tp = np.cumsum(y_sorted)[last_of_value]
    predicted = last_of_value + 1
    f1 = 2 * tp / (predicted + y.sum())
    best = int(np.argmax(f1))
    # Predict positive down to the best distinct score; the threshold sits halfway to the next one.
    value = s_sorted[last_of_value[best]]
    below = s_sorted[last_of_value[best + 1]] if best + 1 < len(last_of_value) else value - 1.0
    return float((value + below) / 2), float(f1[best])


def select_thresholds(
    scores: np.ndarray, targets: np.ndarray, known: np.ndarray | None = None, default: float = 0.5
) -> np.ndarray:
    """(L,) thresholds on ``scores`` (probabilities), one per label, by validation F1."""
    known = np.ones_like(targets, dtype=bool) if known is None else np.asarray(known, dtype=bool)
    out = np.full(scores.shape[1], default, dtype=np.float64)
    for j in range(scores.shape[1]):
        rows = known[:, j]
        out[j] = best_f1_threshold(targets[rows, j], scores[rows, j], default)[0]
    return out
