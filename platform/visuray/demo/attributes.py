"""The attribute stage of the demo: an attribute model and its pooled baseline on the demo catalog.

The demo catalog is the bundled clothing-small sample (folder-ingested: the class is the row's ``label``).
Its attribute groups are derived from the class (:func:`visuray.attributes.labels.clothing_small_groups`):

- ``garment``: the class itself (10 labels),
- ``body_region``: upper body / lower body / footwear / headwear; a dress is both upper and lower body,
  so this group is genuinely multi-label,
- ``sleeves``: short / long / none; shirts and dresses come with either, so they are *unknown* for this
  group (masked out of loss and metrics, not counted as negatives).

Both models (channel-attention head and the pooled baseline) train in this process with the same step
function, data order and initialisation as the Ray Train job (:mod:`visuray.attributes.fit`), which keeps
the stage inside its ~60 s budget on two cores (a Ray Train run costs several seconds of start-up on its
own); the attention model is then published as an attribute model artifact the predictor loads. Both
start from the bundled ImageNet weights with the early stages frozen.
With ~300 photos the held-out split has ~60, so several labels have too few positives to be scored;
they are listed, not averaged in.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from visuray.attributes.config import AttributeTrainConfig

log = logging.getLogger(__name__)


def run_demo_attribute_stage(job: AttributeTrainConfig) -> dict[str, Any]:
    """Train attention and baseline models of ``job``'s architecture (its ``train.steps``, batch, rate and
    frozen blocks) on ``job.catalog``, evaluate both on held-out photos, publish the attention model to
    ``job.output``; returns the figures and paths. The bundled ImageNet weights at 128 px: the last tap is
    a 4 x 4 map of 320 channels, so the attention has positions to choose from."""
    import torch

    from visuray.attributes.config import SplitSection
    from visuray.attributes.data import decode_to_uint8, prepare_catalog, resolve_model_config
    from visuray.attributes.evaluate import evaluate_prepared
    from visuray.attributes.export import save_attribute_model
    from visuray.attributes.fit import fit_in_process
    from visuray.attributes.labels import clothing_small_groups
    from visuray.attributes.metrics import micro_roc_curve, plot_roc_png
    from visuray.attributes.model import build_attribute_model
    from visuray.models.weights import check_pretrained, prepare_for_training

    started = time.monotonic()
    out = Path(job.output).absolute()
    out.mkdir(parents=True, exist_ok=True)
    tc, steps = job.train, job.train.steps
    specs = clothing_small_groups()
    data = prepare_catalog(job.catalog, None, specs, SplitSection(val_fraction=0.15, test_fraction=0.2), 5)
    arch = job.model.model_copy(update={"backbone": check_pretrained(job.model.backbone)})
    spec = arch.backbone.input_spec
    train = data.splits["train"]
    images = decode_to_uint8([data.rows.image_bytes(i) for i in train], spec.img_size)
    names = data.space.names
    test = data.splits["test"]

    results, models = {}, {}
    for head in ("attention", "pooled"):
        model_cfg = resolve_model_config(arch.model_copy(update={"head": head}), specs, data.space)
        torch.manual_seed(0)  # the same head initialisation for both
        model = build_attribute_model(model_cfg)
        prepare_for_training(model.backbone, model_cfg.backbone, freeze_blocks=tc.freeze_blocks)
        losses = fit_in_process(
            model, images, spec, data.targets[train], data.known[train], job.loss, steps=steps,
            batch_size=tc.batch_size, lr=tc.lr, warmup_steps=tc.warmup_steps, seed=tc.seed,
        )  # fmt: skip
        evaluation = evaluate_prepared(model, data, spec, min_positives=3)
        evaluation["losses"] = losses
        results[head], models[head] = evaluation, (model, model_cfg)
        log.info("attribute demo, %s head: test macro AUC %.3f", head, evaluation["test"]["macro_auc"])

    evaluated = [names.index(e["label"]) for e in results["attention"]["test"]["per_label"]]
    curves = {}
    for head, title in (("attention", "channel-attention head"), ("pooled", "pooled baseline")):
        fpr, tpr = micro_roc_curve(
            results[head]["test_scores"], data.targets[test], data.known[test], evaluated
        )
        curves[title] = (fpr, tpr, results[head]["test"]["micro_auc"])
    roc_png = plot_roc_png(out / "attributes_roc.png", curves, "attributes on held-out demo photos (micro)")

    model, model_cfg = models["attention"]
    attention = results["attention"]
    artifact = save_attribute_model(
        str(out / "attribute-model"),
        model,
        model_cfg,
        attention["thresholds"],
        evaluation={"test": attention["test"]},
        roc_png=roc_png,
        metadata={"trained_by": "demo", "train_steps": steps, "catalog": job.catalog},
    )
    baseline = results["pooled"]["test"]
    return {
        "mean_auc": attention["test"]["macro_auc"],
        "baseline_mean_auc": baseline["macro_auc"],
        "micro_auc": attention["test"]["micro_auc"],
        "baseline_micro_auc": baseline["micro_auc"],
        "map": attention["test"]["map"],
        "baseline_map": baseline["map"],
        "labels_evaluated": attention["test"]["num_evaluated"],
        "too_few_positives": [e["label"] for e in attention["test"]["too_few"]],
        "labels": names,
        "groups": [g.name for g in data.space.groups],
        "held_out_photos": len(test),
        "roc_png": str(roc_png),
        "model": artifact.uri,
        "model_version": artifact.manifest.version,
        "steps": steps,
        "seconds": round(time.monotonic() - started, 1),
    }
