"""Metric-learning losses, miners and distances, composed by passing instances.

Every loss is called as ``loss(embeddings, labels)`` and records how many tuples it saw in
``last_num_tuples``. Importing this package imports torch: it is meant for training workers, not for the
CLI or a driver.

- :class:`TripletMarginLoss` with a miner from :mod:`visuray.metric_learning.losses.mining` (batch-all, batch-hard,
  semi-hard) on cosine or euclidean distance;
- :class:`AdaptiveTripletLoss`: the weakly supervised ATL, margins from title-text distances;
- :class:`MultiSimilarityLoss`, :class:`ContrastiveLoss`: pytorch-metric-learning's, adapted.
"""

from visuray.metric_learning.losses.adaptive_triplet import AdaptiveTripletLoss
from visuray.metric_learning.losses.mining import (
    MINERS,
    BatchAllMiner,
    BatchHardMiner,
    SemiHardMiner,
    Triplets,
    build_miner,
)
from visuray.metric_learning.losses.pair_losses import ContrastiveLoss, MultiSimilarityLoss
from visuray.metric_learning.losses.triplet import (
    TripletMarginLoss,
    cosine_distance_matrix,
    distance_matrix,
    euclidean_distance_matrix,
)

__all__ = [
    "MINERS",
    "AdaptiveTripletLoss",
    "BatchAllMiner",
    "BatchHardMiner",
    "ContrastiveLoss",
    "MultiSimilarityLoss",
    "SemiHardMiner",
    "TripletMarginLoss",
    "Triplets",
    "build_miner",
    "cosine_distance_matrix",
    "distance_matrix",
    "euclidean_distance_matrix",
]
