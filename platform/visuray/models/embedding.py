"""The embedding model: backbone features -> projection -> L2-normalised embedding, and its artifact.

Unit vectors make cosine similarity a dot product, which is what the FAISS inner-product index and the
metric losses (on cosine or euclidean distance, which agree in ranking on the unit sphere) expect.

A model artifact (kind ``model``) holds ``model.safetensors`` (the state dict), ``model.yaml`` (the
:class:`~visuray.models.config.EmbeddingModelConfig` that rebuilds it, input preprocessing included) and
``config.yaml`` (the job config that produced it), and its manifest metadata says ``model_version``,
``embedding_dim``, ``task``, ``backbone``, ``img_size``, ``mean``, ``std`` and ``code_version``, which the
index and Serve stages record next to what they build.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from pydantic import BaseModel
from torch import nn
from torch.nn import functional as F

from visuray.checkpoint import (
    load_state_dict_strict,
    publish_weights,
    read_config,
    resolve_kind,
    tensors_from_bytes,
)
from visuray.images import InputSpec
from visuray.models.backbone import create_backbone
from visuray.models.config import BackboneConfig, EmbeddingModelConfig, input_metadata
from visuray.storage import WEIGHTS_NAME, Artifact, StorageOptions

MODEL_KIND = "model"
BACKBONE_PREFIX = "backbone."  # the backbone's tensors in an embedding model's state dict


class EmbeddingModel(nn.Module):
    """``forward(images) -> (N, D)`` unit vectors; ``features(images)`` gives the pooled backbone output."""

    def __init__(
        self,
        backbone: nn.Module,
        embedding_dim: int,
        projection: str = "linear",
        input_spec: InputSpec | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.embedding_dim = embedding_dim
        # What to_model_input must feed it (size, mean, std): part of the model, not of its caller.
        self.input_spec = input_spec or InputSpec(224)
        width = int(backbone.num_features)
        if projection == "linear":
            self.projection = nn.Linear(width, embedding_dim)
        elif projection == "mlp":
            self.projection = nn.Sequential(
                nn.Linear(width, width), nn.GELU(), nn.Linear(width, embedding_dim)
            )
        else:
            raise ValueError(f"unknown projection {projection!r}; use 'linear' or 'mlp'")

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features (N, num_features), through timm's feature contract."""
        return self.backbone.forward_head(self.backbone.forward_features(images), pre_logits=True)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.projection(self.features(images)), dim=-1)


def build_embedding_model(cfg: EmbeddingModelConfig) -> EmbeddingModel:
    """The embedding model for ``cfg``, randomly initialised (load weights with visuray.checkpoint, or the
    backbone's pretrained weights with :func:`visuray.models.weights.load_pretrained`); a linear
    projection with ``projection_init: orthonormal`` starts orthonormal (seeded from torch's RNG)."""
    model = EmbeddingModel(
        create_backbone(cfg.backbone), cfg.embedding_dim, cfg.projection, cfg.backbone.input_spec
    )
    if cfg.projection_init == "orthonormal":
        if not isinstance(model.projection, nn.Linear):
            raise ValueError("projection_init 'orthonormal' needs projection 'linear'")
        orthonormal_projection_(model.projection, torch.Generator().manual_seed(torch.initial_seed()))
    return model


def orthonormal_projection_(layer: nn.Linear, generator: torch.Generator) -> None:
    """Set ``layer`` (width -> dim, dim <= width) to orthonormal rows and no bias, in place: the identity
    when dim equals width, else a random ``generator``-drawn subspace, which keeps inner products of the
    inputs approximately (Johnson-Lindenstrauss)."""
    dim, width = layer.weight.shape
    if dim > width:
        raise ValueError(f"an orthonormal projection cannot widen: {width} features -> {dim}")
    with torch.no_grad():
        if dim == width:
            layer.weight.copy_(torch.eye(width))
        else:
            gaussian = torch.randn(width, dim, generator=generator)
            layer.weight.copy_(torch.linalg.qr(gaussian).Q.T)
        layer.bias.zero_()


def pooled_feature_model(
    backbone: BackboneConfig, projection_dim: int | None = None, seed: int = 0
) -> tuple[EmbeddingModel, EmbeddingModelConfig]:
    """An embedding model whose embedding is the backbone's L2-normalised pooled features, and its config:
    what ``visuray import-weights`` publishes (the zero-shot baseline) and DINO exports (the teacher).

    The projection is the identity (``embedding_dim`` = the backbone's width), or with ``projection_dim``
    a fixed random projection with orthonormal rows (seeded), which keeps inner products of the
    features approximately while the index shrinks. The backbone is at random init: load its weights."""
    width = int(create_backbone(backbone).num_features)
    dim = projection_dim or width
    if dim > width:
        raise ValueError(f"projection_dim {dim} exceeds the backbone's {width} features")
    cfg = EmbeddingModelConfig(backbone=backbone, embedding_dim=dim, projection="linear")
    model = build_embedding_model(cfg)
    orthonormal_projection_(model.projection, torch.Generator().manual_seed(seed))
    return model, cfg


# ----------------------------------------------------------------------------------------------------
# The artifact
# ----------------------------------------------------------------------------------------------------


def save_model(
    uri: str,
    model: nn.Module,
    model_cfg: EmbeddingModelConfig,
    job_cfg: BaseModel | None = None,
    metadata: Mapping[str, Any] | None = None,
    options: StorageOptions | None = None,
) -> Artifact:
    """Publish ``model`` (DDP-wrapped or not) as a new version of the model artifact at ``uri``."""
    return publish_weights(
        uri,
        MODEL_KIND,
        model,
        model_cfg,
        task="embedding",
        described={
            "embedding_dim": model_cfg.embedding_dim,
            "backbone": model_cfg.backbone.name,
            **input_metadata(model_cfg.backbone),
        },
        job_cfg=job_cfg,
        metadata=metadata,
        options=options,
    )


def resolve_model(uri: str, options: StorageOptions | None = None) -> Artifact:
    """The published model artifact at ``uri`` (root or version folder); other kinds are refused."""
    return resolve_kind(uri, MODEL_KIND, options)


def read_model_config(artifact: Artifact) -> EmbeddingModelConfig:
    return read_config(artifact, EmbeddingModelConfig)


def load_embedding_model(
    uri: str, options: StorageOptions | None = None, map_location: str | torch.device = "cpu"
) -> tuple[nn.Module, Artifact]:
    """Rebuild the model from ``model.yaml`` and load its checksum-verified weights (strictly), in eval mode."""
    artifact = resolve_model(uri, options)
    model = build_embedding_model(read_model_config(artifact))
    load_state_dict_strict(model, tensors_from_bytes(artifact.read(WEIGHTS_NAME)), artifact.uri)
    return model.to(map_location).eval(), artifact
