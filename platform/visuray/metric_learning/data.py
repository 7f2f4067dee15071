"""What the fine-tuning loop reads: augmented catalog photos, the labels the sampler and the loss see (the
catalog's classes, or fine-grained classes from product titles for the adaptive triplet loss), the P x K
batch sampler and an endless stream of its batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from visuray.images import InputSpec
from visuray.metric_learning.config import FinetuneConfig, TrainSection

if TYPE_CHECKING:
    pass


def train_transform(spec: InputSpec) -> Any:
    """Light augmentation for metric learning: the same product under crops and flips stays the same.
    Normalised with the model's own statistics (``spec``), as every later stage feeds it."""
    import torch
    from torchvision.transforms import v2

    return v2.Compose(
        [
            v2.PILToTensor(),
            v2.RandomResizedCrop(spec.img_size, scale=(0.6, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(spec.mean, spec.std),
        ]
    )


@dataclass
class TrainingLabels:
    """What the sampler and the loss see: one class and one category per catalog row."""

    labels: list[int]
    categories: list[int]
    semantic_distances: Any = None  # (C, C) numpy array for the adaptive triplet loss
    names: list[str] | None = None


def training_labels(dataset: Any, cfg: FinetuneConfig) -> TrainingLabels:
    """The catalog's labels and categories, or, for the adaptive triplet loss, fine-grained classes from
    the titles within each coarse label (which then plays the category)."""
    if cfg.loss.name != "adaptive_triplet":
        return TrainingLabels(list(dataset.labels), list(dataset.categories))
    from visuray.metric_learning.weak_labels import fine_grained_classes

    weak = fine_grained_classes(
        dataset.labels,
        dataset.titles,
        dataset.label_names,
        target_size=cfg.weak_labels.target_size,
        min_size=cfg.weak_labels.min_size,
        seed=cfg.train.seed,
    )
    return TrainingLabels(weak.labels.tolist(), list(dataset.labels), weak.semantic_distances, weak.names)


def build_sampler(labels: TrainingLabels, tc: TrainSection, rank: int, world_size: int) -> Any:
    from visuray.metric_learning.samplers import CategoryBalancedSampler, PKSampler

    if tc.single_category_prob > 0:
        return CategoryBalancedSampler(
            labels.labels, labels.categories, tc.p, tc.k, tc.single_category_prob, seed=tc.seed, rank=rank,
            world_size=world_size,
        )  # fmt: skip
    return PKSampler(labels.labels, tc.p, tc.k, seed=tc.seed, rank=rank, world_size=world_size)


def endless_batches(loader: Any, sampler: Any, start_step: int) -> Any:
    """Batches from ``loader`` epoch after epoch, starting where step ``start_step`` left off."""
    epoch, skip = divmod(start_step, sampler.num_batches)
    while True:
        sampler.set_epoch(epoch, start_batch=skip)
        yield from loader
        epoch, skip = epoch + 1, 0
