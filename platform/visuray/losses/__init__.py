"""Metric-learning losses, miners and distances, composed by passing instances.

Importing this package imports torch: it is meant for training workers, not for the CLI or a driver.
"""

from visuray.losses.triplet import (
    BatchHardMiner,
    TripletMarginLoss,
    Triplets,
    cosine_distance_matrix,
    distance_matrix,
    euclidean_distance_matrix,
)

__all__ = [
    "BatchHardMiner",
    "TripletMarginLoss",
    "Triplets",
    "cosine_distance_matrix",
    "distance_matrix",
    "euclidean_distance_matrix",
]
