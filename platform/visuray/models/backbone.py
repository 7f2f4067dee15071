"""Backbones come from timm's registry, and are consumed only through timm's feature contract.

``timm.create_model(name, num_classes=0)`` gives a model whose ``forward_features`` returns the unpooled
features and whose ``forward_head(features, pre_logits=True)`` pools them into one ``num_features``
vector per image. Every Visuray head (embedding, attributes, fusion) goes through those two calls, so any
registry name works, ViT or CNN, without slicing a model's internals.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import Field

from visuray.config import StrictModel

if TYPE_CHECKING:
    from torch import nn


class BackboneConfig(StrictModel):
    """Which timm architecture to build, and the few size knobs small-scale runs need."""

    name: str = Field(
        "vit_tiny_patch16_224",
        description="any timm registry name; a ViT by default because the SSL pretraining produces ViTs",
    )
    img_size: int = Field(
        64,
        gt=0,
        description="training/serving resolution; 64 px keeps CPU runs fast, use 224 on GPUs. Passed to "
        "architectures with a fixed input size (ViTs); CNNs take any size",
    )
    patch_size: int | None = Field(
        8,
        gt=0,
        description="ViT patch size; 8 px patches give an 8x8 token grid at 64 px (16 px patches would "
        "leave only 16 tokens). None for CNNs or to keep the architecture's own",
    )
    depth: int | None = Field(
        2,
        gt=0,
        description="number of ViT blocks; 2 keeps tests and CPU demos small (vit_tiny has 12). None for "
        "CNNs or to keep the architecture's own",
    )
    drop_path_rate: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="stochastic depth; 0 for short runs, ~0.1 helps longer fine-tuning of deep ViTs",
    )


def backbone_kwargs(cfg: BackboneConfig) -> dict[str, Any]:
    """The keyword arguments handed to ``timm.create_model`` for ``cfg``.

    ``img_size`` only goes to architectures whose pretrained config declares a fixed input size (ViTs,
    Swin, ...): CNN constructors do not accept it and need no size. ``patch_size`` and ``depth`` go only
    when set, so a CNN is configured by leaving them None.
    """
    import timm.models

    kwargs: dict[str, Any] = {"drop_path_rate": cfg.drop_path_rate}
    pretrained_cfg = timm.models.get_pretrained_cfg(cfg.name)
    if pretrained_cfg is not None and getattr(pretrained_cfg, "fixed_input_size", False):
        kwargs["img_size"] = cfg.img_size
    if cfg.patch_size is not None:
        kwargs["patch_size"] = cfg.patch_size
    if cfg.depth is not None:
        kwargs["depth"] = cfg.depth
    return kwargs


def create_backbone(cfg: BackboneConfig) -> nn.Module:
    """Build the backbone from random init (no hub downloads); weights come from checkpoints."""
    import timm

    if not timm.is_model(cfg.name):
        raise ValueError(f"backbone {cfg.name!r} is not a timm registry name")
    kwargs = backbone_kwargs(cfg)
    try:
        return timm.create_model(cfg.name, pretrained=False, num_classes=0, **kwargs)
    except TypeError as exc:
        raise ValueError(
            f"backbone {cfg.name!r} does not accept {sorted(kwargs)}: {exc}. "
            "Set model.backbone.patch_size and model.backbone.depth to null for CNNs."
        ) from exc
