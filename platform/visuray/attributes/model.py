"""Attribute models: one shared timm backbone, one multi-label head per attribute group at its own depth.

Every group's head reads the backbone's feature map at a chosen tap (timm's ``forward_intermediates``,
the registry-wide contract for intermediate features: ViT blocks, CNN stages), and all taps come from
**one** forward pass that stops at the deepest tap in use.

Heads (``head``):

- ``attention`` (the model): a spatially aware semantic embedding with channel-wise attention. The
  feature map is projected per position into a semantic space (LayerNorm, 1x1 projection, GELU); a
  squeeze-and-excitation gate computed from the whole map reweights those semantic channels, and the
  gated map produces ``num_maps`` spatial attention maps (softmax over positions, so each map's weights
  sum to one). Each map pools the gated semantic map into one vector: positions of the region of interest
  get the weight, background positions little. The pooled vectors are concatenated into the group's
  embedding, normalised, and a linear layer gives one logit per label (sigmoid: multi-label).
- ``pooled`` (the baseline): global average pooling of the tap's features, LayerNorm, linear.
- ``spatial`` and ``channel`` (ablations): the attention head without the channel gate, or with the
  channel gate but uniform (average) pooling instead of spatial attention.

An optional foreground ``mask`` (N, 1, H, W at image resolution, 1 = may attend) is downsampled to each
tap's grid; masked positions get zero attention weight (a row with no valid position falls back to all).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from visuray.attributes.config import AttributeArchitecture, AttributeModelConfig
from visuray.models.backbone import create_backbone


def num_taps(backbone: nn.Module) -> int:
    """How many taps ``forward_intermediates`` offers (ViT blocks, CNN stages)."""
    if not hasattr(backbone, "forward_intermediates") or not hasattr(backbone, "feature_info"):
        raise ValueError(f"{type(backbone).__name__} has no forward_intermediates; pick another timm model")
    return len(backbone.feature_info)


def tap_channels(backbone: nn.Module, tap: int) -> int:
    return int(backbone.feature_info[tap]["num_chs"])


def grid_mask(mask: torch.Tensor | None, height: int, width: int) -> torch.Tensor | None:
    """(N, H*W) bool: positions whose cell holds any foreground; None when no mask is given."""
    if mask is None:
        return None
    cells = F.adaptive_max_pool2d(mask.float(), (height, width)).flatten(1) > 0
    return cells | ~cells.any(dim=1, keepdim=True)  # nothing valid: attend everywhere


class SemanticAttentionHead(nn.Module):
    """Feature map -> channel-gated semantic map -> spatial attention pooling -> label logits."""

    def __init__(
        self,
        in_channels: int,
        num_labels: int,
        embed_dim: int,
        num_maps: int,
        reduction: int,
        channel_gate: bool = True,
        spatial_attention: bool = True,
    ) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(in_channels)
        self.semantic = nn.Linear(in_channels, embed_dim)
        self.gate = (
            nn.Sequential(
                nn.Linear(embed_dim, max(embed_dim // reduction, 1)),
                nn.ReLU(),
                nn.Linear(max(embed_dim // reduction, 1), embed_dim),
            )
            if channel_gate
            else None
        )
        self.num_maps = num_maps if spatial_attention else 1
        self.attention = nn.Linear(embed_dim, num_maps) if spatial_attention else None
        self.out_norm = nn.LayerNorm(embed_dim * self.num_maps)
        self.classifier = nn.Linear(embed_dim * self.num_maps, num_labels)
        self.last_attention: torch.Tensor | None = None  # (N, maps, H, W) of the latest forward

    def attention_weights(self, semantic: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """(N, maps, P) weights over positions; each map sums to one over the valid positions."""
        if self.attention is None:
            scores = semantic.new_zeros(semantic.shape[0], 1, semantic.shape[1])
        else:
            scores = self.attention(semantic).transpose(1, 2)
        if valid is not None:
            scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
        return scores.softmax(dim=-1)

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        n, _, height, width = features.shape
        tokens = features.flatten(2).transpose(1, 2)  # (N, P, C)
        semantic = F.gelu(self.semantic(self.norm(tokens)))  # (N, P, D)
        if self.gate is not None:
            semantic = semantic * torch.sigmoid(self.gate(semantic.mean(dim=1)))[:, None, :]
        weights = self.attention_weights(semantic, grid_mask(mask, height, width))
        self.last_attention = weights.detach().view(n, self.num_maps, height, width)
        pooled = torch.bmm(weights, semantic).flatten(1)  # (N, maps * D)
        return self.classifier(self.out_norm(pooled))


class PooledLinearHead(nn.Module):
    """The baseline: global average pooling of the tap's features, LayerNorm, one linear layer."""

    def __init__(self, in_channels: int, num_labels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(in_channels)
        self.classifier = nn.Linear(in_channels, num_labels)

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.classifier(self.norm(features.mean(dim=(2, 3))))


class AttributeModel(nn.Module):
    """``forward(images) -> (N, L)`` logits, groups concatenated in config order, from one backbone pass."""

    def __init__(self, backbone: nn.Module, cfg: AttributeModelConfig) -> None:
        super().__init__()
        self.backbone = backbone
        self.group_names = [g.name for g in cfg.groups]
        total = num_taps(backbone)
        self.taps: dict[str, int] = {}
        heads = {}
        for group in cfg.groups:
            depth = group.depth if group.depth is not None else total
            if depth > total:
                raise ValueError(f"group {group.name!r}: depth {depth} > the backbone's {total} taps")
            tap = depth - 1
            self.taps[group.name] = tap
            heads[group.name] = make_head(cfg, tap_channels(backbone, tap), len(group.labels))
        self.heads = nn.ModuleDict(heads)
        self.tap_indices = sorted(set(self.taps.values()))

    def feature_maps(self, images: torch.Tensor) -> dict[int, torch.Tensor]:
        """Every tap in use, NCHW, from a single backbone pass that stops at the deepest one."""
        maps = self.backbone.forward_intermediates(
            images, indices=self.tap_indices, intermediates_only=True, output_fmt="NCHW", stop_early=True
        )
        return dict(zip(self.tap_indices, maps, strict=True))

    def forward_groups(
        self, images: torch.Tensor, mask: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        maps = self.feature_maps(images)
        return {name: self.heads[name](maps[self.taps[name]], mask) for name in self.group_names}

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return torch.cat(list(self.forward_groups(images, mask).values()), dim=1)


def make_head(cfg: AttributeArchitecture, in_channels: int, num_labels: int) -> nn.Module:
    if cfg.head == "pooled":
        return PooledLinearHead(in_channels, num_labels)
    return SemanticAttentionHead(
        in_channels,
        num_labels,
        cfg.embed_dim,
        cfg.num_maps,
        cfg.reduction,
        channel_gate=cfg.head in ("attention", "channel"),
        spatial_attention=cfg.head in ("attention", "spatial"),
    )


def build_attribute_model(cfg: AttributeModelConfig) -> nn.Module:
    """The attribute model for ``cfg``, randomly initialised (weights come from checkpoints)."""
    return AttributeModel(create_backbone(cfg.backbone), cfg)


def build_separate_models(cfg: AttributeModelConfig) -> list[nn.Module]:
    """One single-group model per group (own backbone, same architecture and depth): what the shared pass
    replaces, for the FLOPs/latency comparison."""
    return [build_attribute_model(cfg.model_copy(update={"groups": [group]})) for group in cfg.groups]
