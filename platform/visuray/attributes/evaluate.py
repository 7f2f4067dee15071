"""Held-out evaluation of an attribute model: per-label thresholds chosen on validation (F1), per-label
AUC/AP, macro/micro AUC and mAP on test (and on test products composited onto wild backgrounds), and
the ROC figure.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from visuray.attributes.data import PreparedCatalog
from visuray.images import InputSpec

if TYPE_CHECKING:
    from torch import nn


log = logging.getLogger(__name__)


def wild_editor(spec: str, item_ids: Sequence[str], seed: int) -> Any:
    """``edit(image, i)`` pasting item ``i`` onto a background from ``spec`` ('clutter' or a photo folder)."""
    from visuray.attributes.backgrounds import BackgroundBank

    bank = BackgroundBank() if spec == "clutter" else BackgroundBank.from_folder(spec)
    return lambda img, i: bank.wild(img, item_ids[i], seed)


def evaluate_prepared(
    model: nn.Module,
    data: PreparedCatalog,
    spec: InputSpec,
    min_positives: int,
    wild_backgrounds: str | None = None,
    wild_seed: int = 0,
    batch_size: int = 256,
    roc_png: str | Path | None = None,
    title: str = "attributes: held-out products",
) -> dict[str, Any]:
    """Thresholds on validation, test report (clean and, if asked, wild), ROC figure. Returns
    ``{"thresholds": (L,), "test": report, "test_wild": report | None, "roc_png": path | None,
    "test_scores": (N_test, L)}``."""
    from visuray.attributes.data import decode_to_uint8
    from visuray.attributes.fit import predict_probabilities, thresholds_and_report
    from visuray.attributes.metrics import micro_roc_curve, plot_roc_png, roc_curve

    names = data.space.names

    def scores_of(split: str, edit: Any = None) -> np.ndarray:
        idx = data.splits[split]
        ids = [data.rows.item_ids[i] for i in idx]
        editor = wild_editor(edit, ids, wild_seed) if edit else None
        images = decode_to_uint8([data.rows.image_bytes(i) for i in idx], spec.img_size, editor)
        return predict_probabilities(model, images, spec, batch_size)

    val, test = data.splits["val"], data.splits["test"]
    val_scores, test_scores = scores_of("val"), scores_of("test")
    thresholds, report = thresholds_and_report(
        val_scores, data.targets[val], data.known[val],
        test_scores, data.targets[test], data.known[test], names, min_positives,
    )  # fmt: skip
    wild = None
    curves = {}
    evaluated = [names.index(e["label"]) for e in report["per_label"]]
    if evaluated:
        fpr, tpr = micro_roc_curve(test_scores, data.targets[test], data.known[test], evaluated)
        curves["micro, clean"] = (fpr, tpr, report["micro_auc"])
    if wild_backgrounds:
        wild_scores = scores_of("test", wild_backgrounds)
        wild = thresholds_and_report(
            val_scores, data.targets[val], data.known[val],
            wild_scores, data.targets[test], data.known[test], names, min_positives,
        )[1]  # fmt: skip
        wild["backgrounds"] = wild_backgrounds
        if evaluated:
            fpr, tpr = micro_roc_curve(wild_scores, data.targets[test], data.known[test], evaluated)
            curves["micro, wild backgrounds"] = (fpr, tpr, wild["micro_auc"])
    png = None
    if roc_png is not None and curves:
        known = data.known[test]
        label_curves = {
            names[j]: roc_curve(data.targets[test][known[:, j], j], test_scores[known[:, j], j])
            for j in evaluated
        }
        png = str(plot_roc_png(roc_png, curves, title, label_curves))
    return {
        "thresholds": thresholds,
        "test": report,
        "test_wild": wild,
        "roc_png": png,
        "test_scores": test_scores,
    }
