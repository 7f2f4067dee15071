"""Triplet margin loss with online in-batch mining, built from three small parts:

- a *distance* turns a batch of embeddings into an (N, N) distance matrix (cosine or euclidean);
- a *miner* picks (anchor, positive, negative) index triplets from that matrix and the labels;
- the *loss* applies ``relu(d(a, p) - d(a, n) + margin)`` to the mined triplets and averages.

Other miners (batch-all, semi-hard) return the same :class:`Triplets` and slot into
:class:`TripletMarginLoss` unchanged; other losses reuse the distances. Everything is vectorised over the
batch: the (N, N) matrix is per batch (a few hundred rows), never per catalog.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from torch import nn
from torch.nn import functional as F

DistanceName = Literal["cosine", "euclidean"]

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
    if distance not in DISTANCES:
        raise ValueError(f"unknown distance {distance!r}; use one of {sorted(DISTANCES)}")
    return DISTANCES[distance](embeddings)


@dataclass
class Triplets:
    """Mined triplets as three aligned index tensors into the batch."""

    anchor: torch.Tensor
    positive: torch.Tensor
    negative: torch.Tensor

    def __len__(self) -> int:
        return int(self.anchor.numel())


class TripletMiner(Protocol):
    def __call__(self, distances: torch.Tensor, labels: torch.Tensor) -> Triplets: ...


def label_masks(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(positive, negative) boolean (N, N) masks: same label but not itself, and different label."""
    same = labels[:, None] == labels[None, :]
    itself = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    return same & ~itself, ~same


class BatchHardMiner:
    """For each anchor: its farthest positive and its nearest negative (Hermans et al., 2017).

    Anchors without a positive or without a negative in the batch are left out; mining happens without
    gradient, the loss recomputes the chosen distances with gradient.
    """

    def __call__(self, distances: torch.Tensor, labels: torch.Tensor) -> Triplets:
        with torch.no_grad():
            positive, negative = label_masks(labels)
            valid = positive.any(dim=1) & negative.any(dim=1)
            hardest_positive = distances.masked_fill(~positive, float("-inf")).argmax(dim=1)
            hardest_negative = distances.masked_fill(~negative, float("inf")).argmin(dim=1)
            anchor = torch.nonzero(valid).flatten()
        return Triplets(anchor, hardest_positive[anchor], hardest_negative[anchor])


MINERS: dict[str, type] = {"batch_hard": BatchHardMiner}


class TripletMarginLoss(nn.Module):
    """Mean of ``relu(d(a, p) - d(a, n) + margin)`` over the triplets the miner picks from each batch.

    A batch without any valid triplet (a single class, or only singletons) gives a zero loss that still
    has a gradient path to the embeddings, so every DDP rank runs the same backward pass.
    """

    def __init__(
        self,
        margin: float = 0.2,
        distance: DistanceName = "cosine",
        miner: TripletMiner | None = None,
    ) -> None:
        super().__init__()
        if distance not in DISTANCES:
            raise ValueError(f"unknown distance {distance!r}; use one of {sorted(DISTANCES)}")
        self.margin = margin
        self.distance = distance
        self.miner = miner if miner is not None else BatchHardMiner()
        self.last_num_triplets = 0  # for logging: how many triplets the last batch produced

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        distances = distance_matrix(embeddings, self.distance)
        triplets = self.miner(distances, labels)
        self.last_num_triplets = len(triplets)
        if len(triplets) == 0:
            return embeddings.sum() * 0.0
        ap = distances[triplets.anchor, triplets.positive]
        an = distances[triplets.anchor, triplets.negative]
        return F.relu(ap - an + self.margin).mean()
