"""Multi-label losses for imbalanced labels: BCE with positive weights, and the asymmetric loss.

Both take ``(logits, targets, known)`` with (N, L) shapes; ``known`` (bool) masks out entries whose
ground truth is unknown, and the loss is the mean over known entries, so a batch with many unknowns does
not shrink the gradient. Composed by passing instances, as the metric losses are.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


def positive_weights(targets: np.ndarray, known: np.ndarray, max_weight: float) -> np.ndarray:
    """BCE ``pos_weight`` per label: negatives / positives among known entries, clipped to
    ``[1, max_weight]`` (a label with 3 positives in 9,000 would otherwise get a weight of 3,000)."""
    positives = (targets * known).sum(axis=0)
    negatives = ((1 - targets) * known).sum(axis=0)
    ratio = negatives / np.maximum(positives, 1.0)
    return np.clip(ratio, 1.0, max_weight).astype(np.float32)


def _masked_mean(values: torch.Tensor, known: torch.Tensor | None) -> torch.Tensor:
    if known is None:
        return values.mean()
    weights = known.to(values.dtype)
    return (values * weights).sum() / weights.sum().clamp(min=1.0)


class WeightedBCELoss(nn.Module):
    """Binary cross-entropy per label, positives weighted by ``pos_weight`` (L,) when given."""

    def __init__(self, pos_weight: torch.Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("pos_weight", pos_weight, persistent=False)

    def forward(
        self, logits: torch.Tensor, targets: torch.Tensor, known: torch.Tensor | None = None
    ) -> torch.Tensor:
        per_entry = F.binary_cross_entropy_with_logits(
            logits, targets, pos_weight=self.pos_weight, reduction="none"
        )
        return _masked_mean(per_entry, known)


class AsymmetricLoss(nn.Module):
    """Asymmetric loss (Ridnik et al., 2021): focusing ``gamma_neg`` > ``gamma_pos`` down-weights the
    many easy negatives, and the probability margin ``clip`` discards negatives the model already puts
    below it (and their possibly mislabelled gradients).

    Per entry, with p = sigmoid(logit) and p_m = max(p - clip, 0):
    positives ``-(1 - p)^gamma_pos * log(p)``, negatives ``-p_m^gamma_neg * log(1 - p_m)``.
    """

    def __init__(
        self, gamma_neg: float = 4.0, gamma_pos: float = 0.0, clip: float = 0.05, eps: float = 1e-8
    ) -> None:
        super().__init__()
        self.gamma_neg, self.gamma_pos, self.clip, self.eps = gamma_neg, gamma_pos, clip, eps

    def forward(
        self, logits: torch.Tensor, targets: torch.Tensor, known: torch.Tensor | None = None
    ) -> torch.Tensor:
        p = torch.sigmoid(logits)
        p_neg = (p - self.clip).clamp(min=0) if self.clip > 0 else p
        loss_pos = targets * (1 - p).pow(self.gamma_pos) * torch.log(p.clamp(min=self.eps))
        loss_neg = (1 - targets) * p_neg.pow(self.gamma_neg) * torch.log((1 - p_neg).clamp(min=self.eps))
        return _masked_mean(-(loss_pos + loss_neg), known)
