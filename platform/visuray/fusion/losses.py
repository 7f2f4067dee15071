"""Batch-based softmax contrastive loss for composed retrieval, with a learnable temperature.

Each query's target is its positive; the other targets of the batch are its negatives (the classification
loss over in-batch targets used by TIRG-style and CLIP-style composed retrieval training). Where another
row's target is *also* a valid answer for a query (two queries asking for "a red t-shirt"), that column
is left out of the query's softmax through ``ignore``: it is neither a positive nor a false negative.

The temperature is learned as ``log(1 / T)`` (CLIP's parametrisation) and capped at ``1 / T = 100`` so
that the logits cannot grow without bound.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


class BatchSoftmaxContrastiveLoss(nn.Module):
    def __init__(
        self, init_temperature: float = 0.07, learnable: bool = True, max_scale: float = 100.0
    ) -> None:
        super().__init__()
        if init_temperature <= 0:
            raise ValueError("temperature must be positive")
        log_scale = torch.tensor(math.log(1.0 / init_temperature))
        if learnable:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale)
        self.max_scale = max_scale

    @property
    def temperature(self) -> float:
        return float(1.0 / self.scale().detach())

    def scale(self) -> torch.Tensor:
        return self.log_scale.exp().clamp(max=self.max_scale)

    def forward(
        self, query: torch.Tensor, target: torch.Tensor, ignore: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Mean over rows of ``-log softmax(scale * q_i . t_j)_{j=i}``; ``ignore[i, j]`` (i != j) drops a column."""
        logits = self.scale() * query @ target.t()
        if ignore is not None:
            ignore = ignore & ~torch.eye(len(query), dtype=torch.bool, device=ignore.device)
            logits = logits.masked_fill(ignore, float("-inf"))
        labels = torch.arange(len(query), device=query.device)
        return F.cross_entropy(logits, labels)


class FusionObjective(nn.Module):
    """Model and loss in one module, so that DDP syncs the temperature's gradient with the rest and one
    state dict (``model.*``, ``loss.*``) checkpoints both."""

    def __init__(self, model: nn.Module, loss: BatchSoftmaxContrastiveLoss) -> None:
        super().__init__()
        self.model = model
        self.loss = loss

    def forward(
        self,
        reference: torch.Tensor,
        ids: torch.Tensor,
        padding_mask: torch.Tensor,
        target: torch.Tensor,
        ignore: torch.Tensor | None = None,
    ) -> torch.Tensor:
        query, target_embedding = self.model(reference, ids, padding_mask, target)
        return self.loss(query, target_embedding, ignore)
