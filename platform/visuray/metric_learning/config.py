"""The ``finetune`` job's config: metric fine-tuning of an embedding model (optimisation and P x K
batches, the objective, weak labels, validation, DeepSpeed, scaling). Pydantic only, no torch: the CLI and
job specs import it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from visuray.config import StrictModel
from visuray.models.config import EmbeddingModelConfig
from visuray.train import common
from visuray.train.deepspeed_engine import DeepSpeedSection
from visuray.train.validation import ValidationSection

if TYPE_CHECKING:
    pass


class TrainSection(common.TrainLoopSection):
    """Optimisation, batches and bookkeeping of the loop."""

    steps: int = common.total_steps_field(1000)
    p: int = Field(
        8,
        ge=2,
        description="P: classes per batch; at least 2 so every anchor has negatives. P*K=64 fits a small "
        "GPU at 224 px; raise P rather than K for more negatives",
    )
    k: int = Field(
        4,
        ge=2,
        description="K: items per class; 4 is the usual batch-hard choice (Hermans et al.): enough "
        "positives to mine from, while most product classes have at least 4 photos",
    )
    single_category_prob: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="share of batches whose P classes all come from one product category (hard "
        "negatives). 0 = plain P x K; ~0.5 once the embedding separates categories. The category is the "
        "catalog's category column, or, for the adaptive triplet loss, the coarse label",
    )
    lr: float = Field(3e-4, gt=0, description="peak AdamW learning rate; 3e-4 suits ViT-tiny at P*K=32-64")
    min_lr: float = Field(1e-6, ge=0, description="end of the cosine decay (DINO's choice)")
    weight_decay: float = Field(
        0.05, ge=0, description="AdamW decay on weight matrices only (not biases/norms); 0.05 as for ViTs"
    )
    warmup_steps: int = Field(
        50, ge=0, description="linear warm-up; ViTs diverge with a full learning rate from the first step"
    )
    clip_grad_norm: float | None = Field(
        3.0, gt=0, description="gradient-norm clip (DINO uses 3.0); guards against hard-triplet spikes"
    )
    freeze_blocks: int = common.freeze_blocks_field()
    freeze_backbone_steps: int = Field(
        0,
        ge=0,
        description="train only the embedding head (backbone learning rate 0) for the first N steps, so a "
        "fresh random projection does not send large gradients into a pretrained backbone. 0 = never",
    )
    layer_decay: float | None = Field(
        None,
        gt=0,
        le=1,
        description="layer-wise learning-rate decay: block group i of L (ViT block, CNN stage) gets lr * "
        "decay^(L + 1 - i), the head the full lr. 0.65-0.75 is usual when fine-tuning a pretrained ViT "
        "(BEiT, MAE); None = one lr",
    )
    checkpoint_every: int = common.checkpoint_every_field()
    keep_checkpoints: int = common.keep_checkpoints_field()
    log_every: int = common.log_every_field()
    seed: int = Field(0, description="initialisation and batch order; equal seeds give equal runs")
    data_workers: int = Field(
        2,
        ge=0,
        description="DataLoader processes per training worker that decode and augment images; 0 decodes in "
        "the training process (tests, tiny catalogs)",
    )


class LossSection(StrictModel):
    """Which metric objective, and its knobs (each used only by the losses named in its description)."""

    name: Literal["triplet", "adaptive_triplet", "multi_similarity", "contrastive"] = Field(
        "multi_similarity",
        description="multi_similarity learns from random init on the bundled sample, where batch-hard "
        "triplets collapse (see benchmarks/README.md); triplet/adaptive_triplet suit a pretrained backbone",
    )
    distance: Literal["cosine", "euclidean"] = Field(
        "cosine",
        description="triplet, adaptive_triplet, contrastive: cosine matches the inner-product index the "
        "embeddings are served from (multi_similarity is defined on cosine similarity only)",
    )
    miner: Literal["batch_all", "batch_hard", "semi_hard"] = Field(
        "batch_all",
        description="triplet, adaptive_triplet: in-batch mining. batch_all (averaged over active "
        "triplets) is stable from random init; batch_hard is stronger on a pretrained backbone but can "
        "collapse from scratch; semi_hard sits between",
    )
    margin: float = Field(
        0.2,
        ge=0,
        description="triplet: the margin; adaptive_triplet: the margin between the closest classes. 0.2 "
        "on cosine distance (range [0, 2]) is a common start",
    )
    margin_scale: float = Field(
        0.2,
        ge=0,
        description="adaptive_triplet: margin = margin + margin_scale * semantic distance (in [0, 1]), so "
        "textually unrelated negatives must be up to 0.2 farther than near-duplicates",
    )
    ms_alpha: float = Field(2.0, gt=0, description="multi_similarity: positive-pair scale (the paper's 2)")
    ms_beta: float = Field(50.0, gt=0, description="multi_similarity: negative-pair scale (the paper's 50)")
    ms_base: float = Field(
        0.5, description="multi_similarity: similarity threshold between pulled and pushed pairs (0.5)"
    )
    pos_margin: float = Field(
        0.0, ge=0, description="contrastive: positive pairs closer than this cost nothing (0: pull fully)"
    )
    neg_margin: float = Field(
        0.5, ge=0, description="contrastive: negative pairs farther than this cost nothing; 0.5 on cosine"
    )


class WeakLabelSection(StrictModel):
    """Fine-grained classes from title text, for the adaptive triplet loss (see visuray.metric_learning.weak_labels)."""

    target_size: int = Field(
        16, ge=2, description="intended items per fine class: about 4 P x K draws (K=4) before repeats"
    )
    min_size: int = Field(
        4, ge=1, description="smaller title clusters are merged into the nearest one; K items must exist"
    )


class FinetuneDeepSpeedSection(DeepSpeedSection):
    """DeepSpeed for fine-tuning: ZeRO-1 by default (see the field)."""

    zero_stage: Literal[0, 1, 2, 3] = Field(
        1,
        description="fine-tuned embedding models are small: ZeRO-1 (optimizer state sharded) already "
        "removes most of the redundant memory, without ZeRO-2/3's extra communication per step",
    )


class FinetuneConfig(common.TrainingJobConfig):
    """The ``finetune`` job: a catalog with labels in, model artifact out."""

    job: Literal["finetune"] = "finetune"
    name: str = common.run_name_field("finetune")
    init_from: str | None = common.init_from_field()
    model: EmbeddingModelConfig = Field(default_factory=EmbeddingModelConfig)
    train: TrainSection = Field(default_factory=TrainSection)
    loss: LossSection = Field(default_factory=LossSection)
    weak_labels: WeakLabelSection = Field(default_factory=WeakLabelSection)
    validation: ValidationSection = Field(default_factory=ValidationSection)
    deepspeed: FinetuneDeepSpeedSection = Field(default_factory=FinetuneDeepSpeedSection)
    scaling: common.ScalingSection = Field(default_factory=common.ScalingSection)
