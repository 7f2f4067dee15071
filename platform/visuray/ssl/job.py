"""The ``pretrain`` job's driver: DINO on Ray Train (:mod:`visuray.ssl.loop`), then the teacher's
backbone (DINO evaluates the teacher) published as a model artifact that
:func:`visuray.models.embedding.load_embedding_model` and ``model.backbone.weights`` read: an embedding
model whose projection is the identity (``embedding_dim`` = the backbone's width), so its embedding is the
L2-normalised pooled teacher feature that DINO's k-NN evaluation uses.

A worker failure restarts the worker group from the latest checkpoint (``scaling.max_failures``); running
the job again with the same ``name`` and ``run_dir`` continues that run. Resuming needs the same number
of workers and ZeRO stage (ZeRO shards are per rank).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from visuray.ssl.config import PretrainConfig
from visuray.ssl.loop import load_teacher_tensors, read_checkpoint_state, train_loop_per_worker
from visuray.storage import absolute_uri, is_remote
from visuray.train import common
from visuray.train.validation import validation_metric_names

if TYPE_CHECKING:
    import torch
    from torch import nn


log = logging.getLogger(__name__)


def tensorboard_dir(cfg: PretrainConfig) -> str | None:
    """Where rank 0 writes TensorBoard events: ``<run_dir>/<name>/tensorboard`` for a local run_dir,
    resolved on the driver (workers have another working directory); None when off or remote."""
    if not cfg.train.tensorboard or is_remote(cfg.run_dir):
        return None
    return os.path.join(absolute_uri(cfg.run_dir), cfg.name, "tensorboard")


def build_trainer(cfg: PretrainConfig, callbacks: Sequence[Any] = ()) -> Any:
    from visuray.catalog.readers import read_catalog_dataset
    from visuray.train.deepspeed_engine import load_deepspeed_config
    from visuray.train.ray_job import build_torch_trainer

    ds_base = load_deepspeed_config(cfg.deepspeed.zero_stage, cfg.deepspeed.config)
    dataset = read_catalog_dataset(absolute_uri(cfg.catalog), cfg.storage, columns=["image"])
    loop_config = {
        "job": cfg.model_dump(mode="json"),
        "deepspeed": ds_base,
        "tensorboard_dir": tensorboard_dir(cfg),
    }
    return build_torch_trainer(
        train_loop_per_worker,
        loop_config,
        cfg,
        extra_resources=cfg.scaling.resources_per_worker,
        datasets={"train": dataset},
        callbacks=callbacks,
    )


def export_teacher_backbone(
    teacher_tensors: dict[str, torch.Tensor], cfg: PretrainConfig, metadata: dict[str, Any]
) -> Any:
    """Publish the teacher's backbone as an embedding model with an identity projection (see the module
    docstring); returns the artifact."""
    from visuray.checkpoint import load_state_dict_strict
    from visuray.models.embedding import BACKBONE_PREFIX, pooled_feature_model, save_model

    model, model_cfg = pooled_feature_model(cfg.model.backbone.model_copy(update={"drop_path_rate": 0.0}))
    backbone = {
        k[len(BACKBONE_PREFIX) :]: v for k, v in teacher_tensors.items() if k.startswith(BACKBONE_PREFIX)
    }
    load_state_dict_strict(model.backbone, backbone, "the pretraining teacher's backbone")
    batchnorm = recalibrate_batchnorm(model.backbone, cfg)
    return save_model(
        cfg.output, model, model_cfg, job_cfg=cfg,
        metadata={**metadata, "projection_init": "identity", "batchnorm_statistics": batchnorm},
        options=cfg.storage,
    )  # fmt: skip


def recalibrate_batchnorm(backbone: nn.Module, cfg: PretrainConfig) -> str | None:
    """Recompute ``backbone``'s BatchNorm statistics on ``cfg.export.batchnorm_images`` clean catalog
    images (see :class:`PretrainExportSection`); returns what its statistics now are, for the artifact's
    metadata (None for a backbone without BatchNorm)."""
    from visuray.catalog.readers import sample_catalog_images
    from visuray.images import encoded_image_batches
    from visuray.models.batchnorm import batchnorm_layers, reestimate_batchnorm

    if not batchnorm_layers(backbone):
        return None
    if cfg.model.backbone.freezes_batchnorm:
        return "the starting weights' (held fixed while training: model.backbone.batchnorm_statistics)"
    if cfg.export.batchnorm_images == 0:
        return "the teacher's running averages over augmented training crops"
    images = sample_catalog_images(
        absolute_uri(cfg.catalog), cfg.export.batchnorm_images, cfg.storage, seed=cfg.train.seed
    )
    log.info("re-estimating BatchNorm statistics on %d catalog images", len(images))
    seen = reestimate_batchnorm(backbone, encoded_image_batches(images, cfg.model.backbone.input_spec))
    return f"re-estimated on {seen} catalog images (serving preprocessing)"


def with_checked_weights(cfg: PretrainConfig) -> PretrainConfig:
    """``cfg`` with the backbone's starting weights checked and their preprocessing recorded
    (:func:`visuray.models.weights.check_pretrained`), before any worker starts."""
    from visuray.models.weights import check_pretrained

    backbone = check_pretrained(cfg.model.backbone, cfg.storage)
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"backbone": backbone})})


def precheck(cfg: PretrainConfig) -> None:
    """Before a cluster starts (or the job is submitted): the starting weights exist and fit by name."""
    from visuray.models.weights import precheck_weights

    precheck_weights(cfg.model.backbone, cfg.storage)


def run_pretrain(cfg: PretrainConfig, callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    """Pretrain on Ray Train, publish the teacher's backbone as a model artifact, return the summary."""
    from visuray.cluster import ensure_ray
    from visuray.train.ray_job import fit_checkpointed

    ensure_ray()
    cfg = with_checked_weights(cfg)
    log.info("pretrain %r: %d steps on %s -> %s", cfg.name, cfg.train.steps, cfg.catalog, cfg.output)
    result, summary = fit_checkpointed(build_trainer(cfg, callbacks), "pretrain", cfg)
    with result.checkpoint.as_directory() as directory:
        state = read_checkpoint_state(directory)
        teacher = load_teacher_tensors(directory)
    artifact = export_teacher_backbone(
        teacher,
        cfg,
        {
            "trained_by": "pretrain",
            "ssl_method": "dino",
            "train_steps": state["step"],
            "final_loss": state.get("loss"),
            "catalog": cfg.catalog,
            "zero_stage": cfg.deepspeed.zero_stage,
        },
    )
    log.info("published model %s (version %s)", artifact.uri, artifact.manifest.version)
    return common.run_summary(
        artifact, result, summary, state["step"], state.get("loss"), tensorboard_dir=tensorboard_dir(cfg)
    )


def reported_metrics(cfg: PretrainConfig) -> set[str]:
    """What every report of the loop carries (a sweep ranks trials by one of them)."""
    return {
        "train/loss",
        "train/lr",
        "train/weight_decay",
        "train/teacher_momentum",
        "train/teacher_temp",
        "train/center_norm",
        "train/images_per_s",
    } | validation_metric_names(cfg.validation)
