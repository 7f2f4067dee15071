"""The attribute model artifact the ``attributes`` deployment loads.

Kind ``attribute_model``; files:

- ``model.safetensors``: the state dict (no pickle),
- ``model.yaml``: the :class:`AttributeModelConfig` (backbone, head, groups with their labels and depths),
- ``labels.json``: label names in logit order, the groups, and per-label thresholds chosen on validation,
- ``evaluation.json``: the held-out report (per-label AUC/AP, macro/micro AUC, mAP, labels with too few
  positives), when evaluated; ``roc.png``: its ROC figure,
- ``config.yaml``: the resolved job config, when given.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from visuray.attributes.config import AttributeModelConfig
from visuray.storage import WEIGHTS_NAME, Artifact, ArtifactError, StorageOptions

if TYPE_CHECKING:
    from torch import nn

ATTRIBUTE_MODEL_KIND = "attribute_model"
MODEL_CONFIG_NAME = "model.yaml"
LABELS_NAME = "labels.json"
EVALUATION_NAME = "evaluation.json"
ROC_NAME = "roc.png"


def save_attribute_model(
    uri: str,
    model: nn.Module,
    model_cfg: AttributeModelConfig,
    thresholds: Sequence[float],
    evaluation: Mapping[str, Any] | None = None,
    roc_png: str | Path | None = None,
    job_cfg: BaseModel | None = None,
    metadata: Mapping[str, Any] | None = None,
    options: StorageOptions | None = None,
) -> Artifact:
    """Publish ``model`` with its label names and thresholds as a new version at ``uri``."""
    from visuray.checkpoint import publish_weights
    from visuray.models.config import input_metadata

    names = model_cfg.label_names
    if len(thresholds) != len(names):
        raise ValueError(f"{len(thresholds)} thresholds for {len(names)} labels")
    labels = {
        "labels": names,
        "groups": {g.name: g.labels for g in model_cfg.groups},
        "thresholds": {name: float(t) for name, t in zip(names, thresholds, strict=True)},
    }
    files: dict[str, str | Path] = {LABELS_NAME: json.dumps(labels, indent=1)}
    if evaluation is not None:
        files[EVALUATION_NAME] = json.dumps(evaluation, indent=1, default=float)
    if roc_png is not None:
        files[ROC_NAME] = Path(roc_png)
    return publish_weights(
        uri,
        ATTRIBUTE_MODEL_KIND,
        model,
        model_cfg,
        task="attributes",
        described={
            "backbone": model_cfg.backbone.name,
            **input_metadata(model_cfg.backbone),
            "head": model_cfg.head,
            "num_labels": len(names),
            "groups": [g.name for g in model_cfg.groups],
        },
        job_cfg=job_cfg,
        metadata=metadata,
        files=files,
        options=options,
    )


def resolve_attribute_model(uri: str, options: StorageOptions | None = None) -> Artifact:
    from visuray.checkpoint import resolve_kind

    return resolve_kind(uri, ATTRIBUTE_MODEL_KIND, options)


def read_attribute_model_config(artifact: Artifact) -> AttributeModelConfig:
    from visuray.checkpoint import read_config

    return read_config(artifact, AttributeModelConfig, MODEL_CONFIG_NAME)


def load_attribute_model(
    uri: str, options: StorageOptions | None = None, map_location: Any = "cpu"
) -> tuple[nn.Module, AttributeModelConfig, dict[str, Any], Artifact]:
    """``(model in eval mode, its config, labels.json, artifact)``; weights checksum-verified, loaded strictly."""
    from visuray.attributes.model import build_attribute_model
    from visuray.checkpoint import load_state_dict_strict, tensors_from_bytes

    artifact = resolve_attribute_model(uri, options)
    cfg = read_attribute_model_config(artifact)
    labels = json.loads(artifact.read(LABELS_NAME))
    if labels["labels"] != cfg.label_names:
        raise ArtifactError(f"{artifact.uri}: {LABELS_NAME} and {MODEL_CONFIG_NAME} disagree on the labels")
    model = build_attribute_model(cfg)
    load_state_dict_strict(model, tensors_from_bytes(artifact.read(WEIGHTS_NAME)), artifact.uri)
    return model.to(map_location).eval(), cfg, labels, artifact
