"""The ``finetune`` job's driver: train on Ray Train (:mod:`visuray.metric_learning.loop`), then publish
the consolidated fp32 weights of the last checkpoint as a model artifact
(:func:`visuray.models.embedding.save_model`): what the index and Serve load.

Resuming: a run is identified by ``run_dir`` + ``name``. Running the job again with the same two (for
example with more ``train.steps``) restores Ray Train's checkpoint manager from that folder, and the loop
continues from the latest checkpoint: the engine's weights and optimizer state (ZeRO shards per rank, so
with the same number of workers and ZeRO stage) and the step. The data order is a function of
(seed, step), so a resumed run sees the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from visuray.metric_learning.config import FinetuneConfig
from visuray.metric_learning.loop import train_loop_per_worker
from visuray.train import common
from visuray.train.common import load_train_checkpoint
from visuray.train.validation import validation_metric_names

if TYPE_CHECKING:
    pass


log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------
# The driver
# ----------------------------------------------------------------------------------------------------


def build_trainer(cfg: FinetuneConfig, callbacks: Sequence[Any] = ()) -> Any:
    from visuray.train.deepspeed_engine import load_deepspeed_config
    from visuray.train.ray_job import build_torch_trainer

    # The DeepSpeed JSON is read here, on the driver, where the repository's jobs/configs is at hand.
    ds_base = load_deepspeed_config(cfg.deepspeed.zero_stage, cfg.deepspeed.config)
    loop_config = {"job": cfg.model_dump(mode="json"), "deepspeed": ds_base}
    return build_torch_trainer(train_loop_per_worker, loop_config, cfg, callbacks=callbacks)


def with_checked_weights(cfg: FinetuneConfig) -> FinetuneConfig:
    """``cfg`` with its backbone's starting weights checked and their preprocessing recorded
    (:func:`visuray.models.weights.check_pretrained`); ``init_from`` becomes the weights."""
    from visuray.models.weights import check_pretrained

    backbone = check_pretrained(cfg.model.backbone, cfg.storage, init_from=cfg.init_from)
    model = cfg.model.model_copy(update={"backbone": backbone})
    return cfg.model_copy(update={"model": model})


def precheck(cfg: FinetuneConfig) -> None:
    """Before a cluster starts (or the job is submitted): the starting weights exist and fit by name."""
    from visuray.models.weights import precheck_weights

    precheck_weights(cfg.model.backbone, cfg.storage, cfg.init_from)


def run_finetune(cfg: FinetuneConfig, callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    """Train on Ray Train, publish the final weights as a model artifact, return the run's summary."""
    from visuray.cluster import ensure_ray
    from visuray.models.embedding import build_embedding_model, save_model
    from visuray.train.ray_job import fit_checkpointed

    ensure_ray()
    cfg = with_checked_weights(cfg)
    log.info("finetune %r: %d steps on %s -> %s", cfg.name, cfg.train.steps, cfg.catalog, cfg.output)
    result, summary = fit_checkpointed(build_trainer(cfg, callbacks), "finetune", cfg)
    # The summary comes from rank 0's return value, with the checkpoint's own state as the fallback.
    model = build_embedding_model(cfg.model)
    state = load_train_checkpoint(result.checkpoint, model)
    final_loss = summary.get("final_loss", state.loss)
    artifact = save_model(
        cfg.output,
        model,
        cfg.model,
        job_cfg=cfg,
        metadata={
            "trained_by": "finetune",
            "train_steps": state.step,
            "final_loss": final_loss,
            "catalog": cfg.catalog,
            "loss": cfg.loss.name,
            "miner": cfg.loss.miner if cfg.loss.name in ("triplet", "adaptive_triplet") else None,
            "init_from": cfg.init_from,
            "zero_stage": cfg.deepspeed.zero_stage,
        },
        options=cfg.storage,
    )
    log.info("published model %s (version %s)", artifact.uri, artifact.manifest.version)
    return common.run_summary(artifact, result, summary, state.step, final_loss)


def reported_metrics(cfg: FinetuneConfig) -> set[str]:
    """What the loop reports (a sweep ranks trials by one of them): the training metrics at every report,
    and ``val/*`` every ``validation.every`` steps when a validation catalog is set."""
    return {"train/loss", "train/lr", "train/tuples", "train/images_per_s"} | validation_metric_names(
        cfg.validation
    )
