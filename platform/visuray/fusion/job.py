"""The ``train_fusion`` job's driver: composed-retrieval training on Ray Train, evaluation, export, HTML
report.

Load the catalog's text, build the templated queries, get a tokenizer (a file, the text-init artifact's,
or trained on the catalog's titles, attribute values and the training queries), then ``TorchTrainer.fit()``
over :func:`visuray.fusion.loop.train_loop_per_worker`. After the run, the last checkpoint's weights are
published with the tokenizer, the metrics and the report (:func:`visuray.fusion.model.save_fusion_model`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from visuray.fusion.config import FusionTrainConfig, validation_metric_names
from visuray.fusion.data import build_fusion_data, load_items, prepare_tokenizer
from visuray.fusion.datasets import (
    TEMPLATED_TEXT_NOTE,
)
from visuray.fusion.loop import build_objective, load_train_checkpoint, train_loop_per_worker
from visuray.train import common

if TYPE_CHECKING:
    from visuray.fusion.tokenizer import TextTokenizer


log = logging.getLogger(__name__)


def build_trainer(cfg: FusionTrainConfig, tokenizer: TextTokenizer, callbacks: Sequence[Any] = ()) -> Any:
    from visuray.train.ray_job import build_torch_trainer

    loop_config = {"cfg": cfg.model_dump(mode="json"), "tokenizer": tokenizer.to_json()}
    return build_torch_trainer(train_loop_per_worker, loop_config, cfg, callbacks=callbacks)


def with_absolute_inputs(cfg: FusionTrainConfig) -> FusionTrainConfig:
    """A copy of ``cfg`` whose local input paths are absolute (the workers resolve them elsewhere)."""
    from visuray.storage import absolute_uri

    out = cfg.model_copy(deep=True)
    out.catalog = absolute_uri(cfg.catalog)
    out.image_init_from = cfg.image_init_from and absolute_uri(cfg.image_init_from)
    out.text_init_from = cfg.text_init_from and absolute_uri(cfg.text_init_from)
    out.tokenizer.path = cfg.tokenizer.path and absolute_uri(cfg.tokenizer.path)
    return out


def precheck(cfg: FusionTrainConfig) -> None:
    """Before a cluster starts (or the job is submitted): the starting weights exist and fit by name."""
    from visuray.models.weights import precheck_weights

    precheck_weights(cfg.model.backbone, cfg.storage, cfg.image_init_from)


def run_train_fusion(cfg: FusionTrainConfig, callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    """Train on Ray Train, publish the model with tokenizer, metrics and report; return the summary."""
    from visuray.cluster import ensure_ray
    from visuray.fusion.html_report import render_report
    from visuray.fusion.model import save_fusion_model
    from visuray.models.weights import check_pretrained
    from visuray.train.ray_job import fit_checkpointed

    # Data and tokenizer problems surface here, in the driver, before any worker starts.
    items, texts = load_items(cfg.catalog, cfg.data, cfg.storage)
    data = build_fusion_data(items, cfg.data)
    tokenizer = prepare_tokenizer(cfg, texts, data)
    ensure_ray()
    cfg = with_absolute_inputs(cfg)  # Ray workers do not share the driver's working directory
    cfg.model.backbone = check_pretrained(cfg.model.backbone, cfg.storage, init_from=cfg.image_init_from)
    cfg.model.text.vocab_size = tokenizer.vocab_size  # the embedding table follows the tokenizer
    log.info(
        "train_fusion %r: %s depth %d, %d steps, %d/%d train/test queries -> %s. %s",
        cfg.name,
        cfg.model.fusion,
        cfg.model.fusion_depth,
        cfg.train.steps,
        len(data.train_queries),
        len(data.test_queries),
        cfg.output,
        TEMPLATED_TEXT_NOTE,
    )
    result, summary = fit_checkpointed(build_trainer(cfg, tokenizer, callbacks), "train_fusion", cfg)
    objective = build_objective(cfg)
    state = load_train_checkpoint(result.checkpoint, objective)
    metrics = summary.get("metrics", {})
    report_html = render_report(
        title=f"Composed retrieval: {cfg.model.fusion} (depth {cfg.model.fusion_depth})",
        metrics=metrics,
        examples=summary.get("examples", []),
        images=_example_images(cfg, summary.get("examples", [])),
        notes=[TEMPLATED_TEXT_NOTE, f"{state['step']} steps; catalog {cfg.catalog}"],
    )
    artifact = save_fusion_model(
        cfg.output,
        objective.model,
        cfg.model,
        tokenizer,
        job_cfg=cfg,
        extra_files={
            "metrics.json": json.dumps(metrics, indent=1, sort_keys=True),
            "report.html": report_html,
        },
        metadata={
            "trained_by": "train_fusion",
            "train_steps": state["step"],
            "final_loss": summary.get("final_loss", state["loss"]),
            "catalog": cfg.catalog,
            "text_note": TEMPLATED_TEXT_NOTE,
            **{k: v for k, v in metrics.items() if k.count("/") == 1},
        },
        options=cfg.storage,
    )
    log.info("published fusion model %s (version %s)", artifact.uri, artifact.manifest.version)
    final_loss = summary.get("final_loss", state["loss"])
    return common.run_summary(
        artifact, result, summary, state["step"], final_loss, metrics=metrics, text_note=TEMPLATED_TEXT_NOTE
    )


def _example_images(cfg: FusionTrainConfig, examples: Sequence[dict[str, Any]]) -> dict[str, bytes]:
    """Encoded images of the report's references and results, read from the catalog."""
    from visuray.catalog.readers import load_catalog_frame

    wanted = {e["reference_id"] for e in examples} | {i for e in examples for i in e["top_ids"]}
    if not wanted:
        return {}
    frame = load_catalog_frame(cfg.catalog, cfg.storage, columns=["item_id", "image"])
    return {i: img for i, img in zip(frame["item_id"], frame["image"], strict=True) if i in wanted}


def reported_metrics(cfg: FusionTrainConfig) -> set[str]:
    """What the loop reports (a sweep ranks trials by one of them): training metrics at every report,
    validation metrics every ``train.validate_every`` steps."""
    return {"train/loss", "train/lr", "train/temperature", "train/queries_per_s"} | validation_metric_names(
        cfg
    )
