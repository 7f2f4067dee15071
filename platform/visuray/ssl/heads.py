"""The DINO projection head: MLP -> L2-normalised bottleneck -> weight-normalised linear layer to K logits.

The last layer is weight-normalised by hand (``weight = g * v / ||v||`` per output row) rather than through
``torch.nn.utils.parametrizations``: its two tensors are then ordinary parameters of one module, which
every DeepSpeed ZeRO stage partitions, gathers and restores like any other weight. With
``norm_last_layer`` (DINO's default) ``g`` is fixed at 1, so every row of the effective weight has unit
norm; this stabilises training and is what DINO recommends for ViTs.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

LAST_LAYER_PREFIX = "last_layer."


class WeightNormLinear(nn.Module):
    """``y = x @ (g * v / ||v||_row).T`` without bias; ``g`` is a fixed 1 when ``fixed_norm``."""

    def __init__(self, in_features: int, out_features: int, fixed_norm: bool = True) -> None:
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.trunc_normal_(self.weight_v, std=0.02)
        # Trainable g (fixed_norm=False) starts at 1 too, as torch's weight_norm would give for rows
        # that are then renormalised; DINO fills it with 1 either way.
        self.weight_g = None if fixed_norm else nn.Parameter(torch.ones(out_features, 1))

    def weight(self) -> torch.Tensor:
        direction = self.weight_v / self.weight_v.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return direction if self.weight_g is None else self.weight_g * direction

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight())


class DINOHead(nn.Module):
    """``nlayers`` of MLP (GELU) to ``bottleneck_dim``, L2 normalisation, then the last layer to ``out_dim``."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        use_bn: bool = False,
        norm_last_layer: bool = True,
    ) -> None:
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"nlayers must be >= 1, got {nlayers}")
        layers: list[nn.Module] = []
        width = in_dim
        for _ in range(nlayers - 1):
            layers.append(nn.Linear(width, hidden_dim))
            if use_bn:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.GELU())
            width = hidden_dim
        layers.append(nn.Linear(width, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        for module in self.mlp.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, fixed_norm=norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1, eps=1e-6))


def build_dino_head(
    in_dim: int,
    out_dim: int,
    hidden_dim: int = 2048,
    bottleneck_dim: int = 256,
    nlayers: int = 3,
    use_bn: bool = False,
    norm_last_layer: bool = True,
) -> DINOHead:
    """A :class:`DINOHead` (see its docstring); arguments as in DINO's ``DINOHead``."""
    return DINOHead(in_dim, out_dim, hidden_dim, bottleneck_dim, nlayers, use_bn, norm_last_layer)


def is_last_layer_parameter(name: str) -> bool:
    """Whether ``name`` (as in ``model.named_parameters()``) belongs to a DINO head's last layer."""
    return name.startswith(LAST_LAYER_PREFIX) or f".{LAST_LAYER_PREFIX}" in name
