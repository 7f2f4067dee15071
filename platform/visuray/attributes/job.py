"""The ``train_attributes`` job's driver: a multi-label attribute model on Ray Train, evaluated and
exported.

1. read the catalog, split products by hash (train / val / test), build the label space from the training
   split's metadata (:mod:`visuray.attributes.labels`);
2. fit a ``TorchTrainer`` around :func:`visuray.attributes.loop.train_loop_per_worker`;
3. load the last checkpoint and evaluate on held-out products (:mod:`visuray.attributes.evaluate`);
4. publish the attribute model artifact (:mod:`visuray.attributes.export`).

Resuming: rerunning with the same ``name`` and ``run_dir`` continues from the latest checkpoint (weights,
optimizer, step).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from visuray.attributes.config import VALIDATION_METRICS, AttributeModelConfig, AttributeTrainConfig
from visuray.attributes.data import prepare_catalog, resolve_model_config
from visuray.attributes.evaluate import evaluate_prepared
from visuray.attributes.loop import train_loop_per_worker
from visuray.train import common

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)


log = logging.getLogger(__name__)


def build_trainer(
    cfg: AttributeTrainConfig, model_cfg: AttributeModelConfig, callbacks: Sequence[Any] = ()
) -> Any:
    from visuray.storage import absolute_uri
    from visuray.train.ray_job import build_torch_trainer

    job = cfg.model_copy(update={"catalog": absolute_uri(cfg.catalog)})  # workers have another cwd
    loop_config = {"job": job.model_dump(mode="json"), "model": model_cfg.model_dump(mode="json")}
    return build_torch_trainer(train_loop_per_worker, loop_config, cfg, callbacks=callbacks)


def summary_metrics(report: dict[str, Any] | None) -> dict[str, Any]:
    if report is None:
        return {}
    return {k: report[k] for k in ("macro_auc", "micro_auc", "map", "num_evaluated")} | {
        "too_few_positives": [e["label"] for e in report["too_few"]]
    }


def precheck(cfg: AttributeTrainConfig) -> None:
    """Before a cluster starts (or the job is submitted): the starting weights exist and fit by name."""
    from visuray.models.weights import precheck_weights

    precheck_weights(cfg.model.backbone, cfg.storage, cfg.init_from)


def run_train_attributes(cfg: AttributeTrainConfig, callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    """Train on Ray Train, evaluate on held-out products, publish the model; return the run's summary."""
    from visuray.attributes.export import save_attribute_model
    from visuray.attributes.model import build_attribute_model
    from visuray.cluster import ensure_ray
    from visuray.models.weights import check_pretrained
    from visuray.train.common import load_train_checkpoint
    from visuray.train.ray_job import fit_checkpointed

    ensure_ray()
    data = prepare_catalog(cfg.catalog, cfg.storage, cfg.labels.groups, cfg.split, cfg.labels.min_count)
    backbone = check_pretrained(cfg.model.backbone, cfg.storage, init_from=cfg.init_from)
    arch = cfg.model.model_copy(update={"backbone": backbone})
    model_cfg = resolve_model_config(arch, cfg.labels.groups, data.space)
    log.info(
        "train_attributes %r: %d labels in groups %s; %d/%d/%d train/val/test products",
        cfg.name,
        len(data.space),
        [g.name for g in data.space.groups],
        *(len(data.splits[s]) for s in ("train", "val", "test")),
    )
    result, summary = fit_checkpointed(build_trainer(cfg, model_cfg, callbacks), "train_attributes", cfg)
    model = build_attribute_model(model_cfg)
    state = load_train_checkpoint(result.checkpoint, model)

    with tempfile.TemporaryDirectory() as tmp:
        evaluation = evaluate_prepared(
            model,
            data,
            model_cfg.backbone.input_spec,
            cfg.eval.min_positives,
            cfg.eval.wild_backgrounds,
            cfg.eval.wild_seed,
            cfg.eval.batch_size,
            roc_png=Path(tmp, "roc.png"),
            title=f"{cfg.name}: held-out products ({model_cfg.head} head)",
        )
        report = {"test": evaluation["test"], "test_wild": evaluation["test_wild"]}
        artifact = save_attribute_model(
            cfg.output,
            model,
            model_cfg,
            evaluation["thresholds"],
            evaluation=report,
            roc_png=evaluation["roc_png"],
            job_cfg=cfg,
            metadata={
                "trained_by": "train_attributes",
                "train_steps": state.step,
                "catalog": cfg.catalog,
                "test/macro_auc": evaluation["test"]["macro_auc"],
                "test/map": evaluation["test"]["map"],
            },
            options=cfg.storage,
        )
    log.info(
        "published attribute model %s: test macro AUC %.4f, mAP %.4f",
        artifact.uri,
        evaluation["test"]["macro_auc"],
        evaluation["test"]["map"],
    )
    return common.run_summary(
        artifact, result, summary, state.step, summary.get("final_loss", state.loss),
        labels=data.space.names, test=summary_metrics(evaluation["test"]),
        test_wild=summary_metrics(evaluation["test_wild"]),
    )  # fmt: skip


def reported_metrics(cfg: AttributeTrainConfig) -> set[str]:
    """What every report of the loop carries (a sweep ranks trials by one of them)."""
    validation = set(VALIDATION_METRICS) if cfg.split.val_fraction > 0 else set()
    return {"train/loss", "train/lr", "train/images_per_s"} | validation
