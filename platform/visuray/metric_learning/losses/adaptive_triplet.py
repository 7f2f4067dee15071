"""The weakly supervised adaptive triplet loss (ATL).

Labels are fine-grained classes derived from product-title text (:mod:`visuray.metric_learning.weak_labels`), not from
annotators, and the margin of each triplet grows with how different, in text, the negative's class is
from the anchor's:

    loss(a, p, n) = relu(d(a, p) - d(a, n) + m(a, n)),   m(a, n) = margin + margin_scale * s(c_a, c_n)

where ``s`` in [0, 1] is the semantic distance between the two fine classes (``1 - cos`` of their mean
TF-IDF title vectors). A "blue Nike running shoe" negative for a "white Nike running shoe" anchor is
pushed away only a little (the classes are close in text, and in fact), while a t-shirt negative for a
shoe anchor must be far. A fixed margin treats both alike: too small for the far one, or so large for
the near one that visually similar products are torn apart.

Mining is any :mod:`~visuray.metric_learning.losses.mining` miner on the fine labels; triplets are averaged as in
:class:`~visuray.metric_learning.losses.triplet.TripletMarginLoss`, of which this is a subclass that changes only the
margin.
"""

from __future__ import annotations

import numpy as np
import torch

from visuray.metric_learning.losses.mining import TripletMiner, Triplets
from visuray.metric_learning.losses.triplet import DistanceName, Reduction, TripletMarginLoss


class AdaptiveTripletLoss(TripletMarginLoss):
    """Triplet loss whose margin adapts to the semantic distance between anchor and negative classes."""

    def __init__(
        self,
        semantic_distances: torch.Tensor | np.ndarray,
        margin: float = 0.1,
        margin_scale: float = 0.2,
        distance: DistanceName = "cosine",
        miner: TripletMiner | None = None,
        reduction: Reduction = "mean",
    ) -> None:
        """``semantic_distances``: (C, C) in [0, 1] between fine classes; labels index its rows."""
        super().__init__(margin=margin, distance=distance, miner=miner, reduction=reduction)
        table = torch.as_tensor(np.asarray(semantic_distances), dtype=torch.float32)
        if table.ndim != 2 or table.shape[0] != table.shape[1]:
            raise ValueError(f"semantic_distances must be square, got shape {tuple(table.shape)}")
        if margin_scale < 0:
            raise ValueError(f"margin_scale must be non-negative (got {margin_scale})")
        self.register_buffer("semantic_distances", table, persistent=False)
        self.margin_scale = margin_scale

    def triplet_margins(self, triplets: Triplets, labels: torch.Tensor) -> torch.Tensor:
        table = self.semantic_distances.to(labels.device)
        if int(labels.max()) >= table.shape[0] or int(labels.min()) < 0:
            raise ValueError(f"labels must index the {table.shape[0]} fine classes of semantic_distances")
        semantic = table[labels[triplets.anchor], labels[triplets.negative]]
        return self.margin + self.margin_scale * semantic
