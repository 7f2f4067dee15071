"""The tiny random-init ViT most tests build: the platform's default backbone is the pretrained
EfficientNet-Lite0, which the tests about pretrained weights use; everything else stays tiny and fast."""

from __future__ import annotations

from typing import Any

TINY_VIT: dict[str, Any] = {
    "name": "vit_tiny_patch16_224",
    "weights": None,
    "img_size": 32,
    "patch_size": 8,
    "depth": 2,
}


def tiny_vit(**changes: Any) -> dict[str, Any]:
    """:data:`TINY_VIT` with ``changes`` (e.g. ``depth=3``)."""
    return {**TINY_VIT, **changes}


def tiny_vit_overrides(prefix: str = "model.backbone", **changes: Any) -> list[str]:
    """The same backbone as dotted command-line overrides under ``prefix``."""
    return [f"{prefix}.{k}={'null' if v is None else v}" for k, v in tiny_vit(**changes).items()]
