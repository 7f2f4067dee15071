"""Image side of a composed query: spatial tokens and a pooled vector, through timm's feature contract.

``forward_features`` gives the unpooled features: (B, T, C) for ViTs (prefix tokens such as [CLS]
included) or (B, C, H, W) for CNNs, flattened here to (B, H*W, C). ``forward_head(pre_logits=True)``
pools them the way the architecture does. No model internals are sliced, so any timm name works.
"""

from __future__ import annotations

import torch
from torch import nn


class ImageEncoder(nn.Module):
    """``forward(images) -> (tokens (B, T, C), pooled (B, C))`` with C = ``backbone.num_features``."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.width = int(backbone.num_features)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.backbone.forward_features(images)
        pooled = self.backbone.forward_head(features, pre_logits=True)
        if features.ndim == 4:  # CNN feature map (B, C, H, W) -> tokens (B, H*W, C)
            tokens = features.flatten(2).transpose(1, 2)
        elif features.ndim == 3:
            tokens = features
        else:
            raise ValueError(f"forward_features returned shape {tuple(features.shape)}; expected 3 or 4 dims")
        return tokens, pooled
