"""Triplet margin loss with online in-batch mining, built from three small parts:

- a *distance* turns a batch of embeddings into an (N, N) distance matrix (cosine or euclidean);
- a *miner* (:mod:`visuray.metric_learning.losses.mining`) picks (anchor, positive, negative) index triplets from that
  matrix and the labels: batch-all, batch-hard or semi-hard;
- the *loss* applies ``relu(d(a, p) - d(a, n) + margin)`` to the mined triplets and averages them, over
  all of them (``reduction="mean"``) or over the ones still violating the margin (``"active"``, the
  usual choice for batch-all, where most triplets are satisfied and would dilute the gradient).

The margin is a method (:meth:`TripletMarginLoss.triplet_margins`) so that the adaptive triplet loss
(:mod:`visuray.metric_learning.losses.adaptive_triplet`) changes only that. Everything is vectorised over the batch: the
(N, N) matrix is per batch (a few hundred rows), never per catalog.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

from visuray.metric_learning.losses.mining import (
    MINERS,
    BatchAllMiner,
    BatchHardMiner,
    SemiHardMiner,
    TripletMiner,
    Triplets,
    label_masks,
)

__all__ = [
    "DISTANCES",
    "MINERS",
    "BatchAllMiner",
    "BatchHardMiner",
    "DistanceName",
    "SemiHardMiner",
    "TripletMarginLoss",
    "Triplets",
    "cosine_distance_matrix",
    "distance_matrix",
    "euclidean_distance_matrix",
    "label_masks",
]

DistanceName = Literal["cosine", "euclidean"]
Reduction = Literal["mean", "active"]

# Below this squared distance the euclidean gradient (1 / 2 sqrt(x)) is replaced by 0: identical
# embeddings (an anchor with itself, or a duplicate image) would otherwise produce inf/NaN gradients.
_EPS = 1e-12


def cosine_distance_matrix(embeddings: torch.Tensor) -> torch.Tensor:
    """``1 - cos(x_i, x_j)``, in [0, 2]; the inputs need not be normalised."""
    unit = F.normalize(embeddings, dim=-1)
    return (1.0 - unit @ unit.T).clamp_min(0.0)


def euclidean_distance_matrix(embeddings: torch.Tensor) -> torch.Tensor:
    """``||x_i - x_j||_2`` through the Gram matrix, with a zero (not NaN) gradient at distance 0."""
    sq_norms = embeddings.pow(2).sum(dim=-1)
    squared = (sq_norms[:, None] + sq_norms[None, :] - 2.0 * embeddings @ embeddings.T).clamp_min(0.0)
    zero = squared < _EPS
    return torch.sqrt(squared + zero.float() * _EPS) * (~zero).float()


DISTANCES = {"cosine": cosine_distance_matrix, "euclidean": euclidean_distance_matrix}


def distance_matrix(embeddings: torch.Tensor, distance: DistanceName) -> torch.Tensor:
    check_distance(distance)
    return DISTANCES[distance](embeddings)


def check_distance(distance: str) -> None:
    if distance not in DISTANCES:
        raise ValueError(f"unknown distance {distance!r}; use one of {sorted(DISTANCES)}")


def zero_loss(embeddings: torch.Tensor) -> torch.Tensor:
    """A zero that still has a gradient path, so every DDP/DeepSpeed rank runs the same backward."""
    return embeddings.sum() * 0.0


class TripletMarginLoss(nn.Module):
    """Average of ``relu(d(a, p) - d(a, n) + margin)`` over the triplets the miner picks from each batch.

    A batch without any valid (or, with ``reduction="active"``, any active) triplet gives a zero loss
    that still has a gradient path to the embeddings.
    """

    def __init__(
        self,
        margin: float = 0.2,
        distance: DistanceName = "cosine",
        miner: TripletMiner | None = None,
        reduction: Reduction = "mean",
    ) -> None:
        super().__init__()
        check_distance(distance)
        if reduction not in ("mean", "active"):
            raise ValueError(f"unknown reduction {reduction!r}; use 'mean' or 'active'")
        self.margin = margin
        self.distance = distance
        self.miner = miner if miner is not None else BatchHardMiner()
        self.reduction = reduction
        self.last_num_tuples = 0  # for logging: how many triplets the last batch produced
        self.last_active_fraction = 0.0  # share of those still violating the margin

    def triplet_margins(self, triplets: Triplets, labels: torch.Tensor) -> torch.Tensor | float:
        """The margin of each triplet (a constant here; per-triplet in the adaptive loss)."""
        return self.margin

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        distances = distance_matrix(embeddings, self.distance)
        triplets = self.miner(distances, labels)
        self.last_num_tuples = len(triplets)
        if len(triplets) == 0:
            self.last_active_fraction = 0.0
            return zero_loss(embeddings)
        ap = distances[triplets.anchor, triplets.positive]
        an = distances[triplets.anchor, triplets.negative]
        hinge = F.relu(ap - an + self.triplet_margins(triplets, labels))
        active = hinge.detach() > 0
        self.last_active_fraction = float(active.float().mean())
        if self.reduction == "active":
            if not active.any():
                return zero_loss(embeddings)
            return hinge[active].mean()
        return hinge.mean()
