"""Pair-based metric losses, taken from pytorch-metric-learning rather than rewritten.

- :class:`MultiSimilarityLoss` (Wang et al., 2019): per anchor,
  ``1/alpha * log(1 + sum_pos exp(-alpha (s_ap - base))) + 1/beta * log(1 + sum_neg exp(beta (s_an - base)))``
  on cosine similarities, averaged over anchors. It weighs every pair by how hard it is relative to the
  others, so it learns from random init where batch-hard triplets collapse.
- :class:`ContrastiveLoss` (Hadsell et al., 2006): ``relu(d_ap - pos_margin)`` for positive pairs and
  ``relu(neg_margin - d_an)`` for negative pairs, each averaged over its non-zero pairs (the library's
  ``AvgNonZeroReducer``), then summed. Margins are given as *distances* for both metrics: on cosine the
  adapter converts them into the library's similarity margins (``s = 1 - d``).

Both take ``(embeddings, labels)`` like :class:`~visuray.metric_learning.losses.triplet.TripletMarginLoss`, return a
zero with a gradient path when the batch has no pair at all (a one-class batch still has positive pairs
to pull together, and a batch of singletons negative pairs to push apart), and count the pairs they saw in
``last_num_tuples``. The library classes are built in the constructors, so importing this module does not
import pytorch-metric-learning.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from visuray.metric_learning.losses.mining import label_masks
from visuray.metric_learning.losses.triplet import DistanceName, check_distance, zero_loss


class _LibraryPairLoss(nn.Module):
    """Calls a pytorch-metric-learning loss; a batch without any pair gives a zero with a gradient."""

    def __init__(self, loss: Any) -> None:
        super().__init__()
        self.loss = loss
        self.last_num_tuples = 0

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        positive, negative = label_masks(labels)
        self.last_num_tuples = int(positive.sum() + negative.sum())
        value = self.loss(embeddings, labels)
        return value if value.requires_grad else zero_loss(embeddings) + value


class MultiSimilarityLoss(_LibraryPairLoss):
    """pytorch-metric-learning's ``MultiSimilarityLoss`` on cosine similarity (the paper's defaults)."""

    def __init__(self, alpha: float = 2.0, beta: float = 50.0, base: float = 0.5) -> None:
        from pytorch_metric_learning import losses

        super().__init__(losses.MultiSimilarityLoss(alpha=alpha, beta=beta, base=base))
        self.alpha, self.beta, self.base = alpha, beta, base


class ContrastiveLoss(_LibraryPairLoss):
    """pytorch-metric-learning's ``ContrastiveLoss`` with margins on cosine or euclidean distance."""

    def __init__(
        self, pos_margin: float = 0.0, neg_margin: float = 0.5, distance: DistanceName = "cosine"
    ) -> None:
        from pytorch_metric_learning import distances, losses

        check_distance(distance)
        if distance == "cosine":
            loss = losses.ContrastiveLoss(
                pos_margin=1.0 - pos_margin,
                neg_margin=1.0 - neg_margin,
                distance=distances.CosineSimilarity(),
            )
        else:
            loss = losses.ContrastiveLoss(
                pos_margin=pos_margin,
                neg_margin=neg_margin,
                distance=distances.LpDistance(normalize_embeddings=False),
            )
        super().__init__(loss)
        self.pos_margin, self.neg_margin, self.distance = pos_margin, neg_margin, distance
