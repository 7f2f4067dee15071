"""Online in-batch triplet mining: which (anchor, positive, negative) triplets of a batch the loss sees.

A miner takes the batch's (N, N) distance matrix and its labels and returns :class:`Triplets` (three
aligned index tensors). Mining runs without gradient; the loss recomputes the chosen distances with it.

- ``batch_all``: every valid triplet (Hermans et al., 2017). Most are already satisfied from early on, so
  the loss averages over the *active* ones (those still violating the margin), as that paper does.
- ``batch_hard``: per anchor, its farthest positive and its nearest negative (Hermans et al., 2017).
  Strong on a pretrained backbone; from random init it can collapse (every embedding the same point,
  loss stuck at the margin), because the hardest negative drags everything together early on.
- ``semi_hard``: per (anchor, positive) pair, the nearest negative that is still *farther* than the
  positive (FaceNet, Schroff et al., 2015); pairs whose negatives are all closer than the positive are
  skipped. Avoids the collapse of batch-hard while keeping informative triplets.

Anchors without a positive or without a negative in the batch give no triplet.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import torch

MinerName = Literal["batch_all", "batch_hard", "semi_hard"]


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


class BatchAllMiner:
    """Every (anchor, positive, negative) of the batch: N * (K - 1) * (N - K) triplets for P x K."""

    def __call__(self, distances: torch.Tensor, labels: torch.Tensor) -> Triplets:
        with torch.no_grad():
            positive, negative = label_masks(labels)
            valid = positive[:, :, None] & negative[:, None, :]  # (a, p, n)
            anchor, pos, neg = torch.nonzero(valid, as_tuple=True)
        return Triplets(anchor, pos, neg)


class BatchHardMiner:
    """For each anchor: its farthest positive and its nearest negative."""

    def __call__(self, distances: torch.Tensor, labels: torch.Tensor) -> Triplets:
        with torch.no_grad():
            positive, negative = label_masks(labels)
            valid = positive.any(dim=1) & negative.any(dim=1)
            hardest_positive = distances.masked_fill(~positive, float("-inf")).argmax(dim=1)
            hardest_negative = distances.masked_fill(~negative, float("inf")).argmin(dim=1)
            anchor = torch.nonzero(valid).flatten()
        return Triplets(anchor, hardest_positive[anchor], hardest_negative[anchor])


class SemiHardMiner:
    """For each (anchor, positive): the nearest negative with ``d(a, n) > d(a, p)``."""

    def __call__(self, distances: torch.Tensor, labels: torch.Tensor) -> Triplets:
        with torch.no_grad():
            positive, negative = label_masks(labels)
            anchor, pos = torch.nonzero(positive, as_tuple=True)
            d_ap = distances[anchor, pos][:, None]  # (pairs, 1)
            farther = negative[anchor] & (distances[anchor] > d_ap)  # (pairs, N)
            candidate = distances[anchor].masked_fill(~farther, float("inf"))
            neg = candidate.argmin(dim=1)
            keep = farther.any(dim=1)
        return Triplets(anchor[keep], pos[keep], neg[keep])


MINERS: dict[str, type] = {
    "batch_all": BatchAllMiner,
    "batch_hard": BatchHardMiner,
    "semi_hard": SemiHardMiner,
}


def build_miner(name: str) -> TripletMiner:
    if name not in MINERS:
        raise ValueError(f"unknown miner {name!r}; use one of {sorted(MINERS)}")
    return MINERS[name]()
