"""The embedding model: backbone features -> projection -> L2-normalised embedding.

Unit vectors make cosine similarity a dot product, which is what the FAISS inner-product index and the
metric losses (on cosine or euclidean distance, which agree in ranking on the unit sphere) expect.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from visuray.config import StrictModel
from visuray.images import InputSpec
from visuray.models.backbone import BackboneConfig, create_backbone

if TYPE_CHECKING:
    import torch
    from torch import nn


class EmbeddingModelConfig(StrictModel):
    """Backbone plus the projection into the retrieval embedding space."""

    backbone: BackboneConfig = Field(default_factory=BackboneConfig)
    embedding_dim: int = Field(
        128,
        gt=0,
        description="128 floats per item keeps a million-item flat index at 512 MB while retrieval "
        "quality is close to larger sizes",
    )
    projection: Literal["linear", "mlp"] = Field(
        "linear",
        description="linear is the usual embedding layer for metric learning; mlp (Linear-GELU-Linear) "
        "gives the loss more room when the backbone is frozen or pretrained on another objective",
    )


def _embedding_module_class() -> type:
    """Defined lazily so that importing this module does not import torch."""
    from torch import nn
    from torch.nn import functional as F

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

    # Pickle and tracebacks find the class by its module-level name (served by __getattr__ below).
    EmbeddingModel.__qualname__ = "EmbeddingModel"
    EmbeddingModel.__module__ = __name__
    return EmbeddingModel


_CLASS: type | None = None


def __getattr__(name: str) -> type:
    # ``from visuray.models.embedding import EmbeddingModel`` works, but only imports torch when asked.
    global _CLASS
    if name == "EmbeddingModel":
        if _CLASS is None:
            _CLASS = _embedding_module_class()
        return _CLASS
    raise AttributeError(name)


def build_embedding_model(cfg: EmbeddingModelConfig) -> nn.Module:
    """The embedding model for ``cfg``, randomly initialised (load weights with visuray.checkpoint, or the
    backbone's pretrained weights with :func:`visuray.models.weights.load_pretrained`)."""
    model_class = __getattr__("EmbeddingModel")
    return model_class(
        create_backbone(cfg.backbone), cfg.embedding_dim, cfg.projection, cfg.backbone.input_spec
    )


def pooled_feature_model(
    backbone: BackboneConfig, projection_dim: int | None = None, seed: int = 0
) -> tuple[nn.Module, EmbeddingModelConfig]:
    """An embedding model whose embedding is the backbone's L2-normalised pooled features, and its config:
    what ``visuray import-weights`` publishes (the zero-shot baseline) and DINO exports (the teacher).

    The projection is the identity (``embedding_dim`` = the backbone's width), or with ``projection_dim``
    a fixed random projection with orthonormal rows (seeded), which keeps inner products of the
    features approximately while the index shrinks. The backbone is at random init: load its weights."""
    import torch

    width = int(create_backbone(backbone).num_features)
    dim = projection_dim or width
    if dim > width:
        raise ValueError(f"projection_dim {dim} exceeds the backbone's {width} features")
    cfg = EmbeddingModelConfig(backbone=backbone, embedding_dim=dim, projection="linear")
    model = build_embedding_model(cfg)
    with torch.no_grad():
        if dim == width:
            model.projection.weight.copy_(torch.eye(width))
        else:
            gaussian = torch.randn(width, dim, generator=torch.Generator().manual_seed(seed))
            model.projection.weight.copy_(torch.linalg.qr(gaussian).Q.T)
        model.projection.bias.zero_()
    return model, cfg
