"""Configs of attribute models: the architecture and the resolved groups (what ``model.yaml`` in an
attribute model artifact rebuilds), and the ``train_attributes`` job's sections. Pydantic only, no torch:
the CLI and job specs import it."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from visuray.attributes.labels import AttributeGroupSpec, fashion_groups
from visuray.config import StrictModel
from visuray.models.config import BackboneConfig
from visuray.train import common

HeadKind = Literal["attention", "pooled", "spatial", "channel"]


class AttributeArchitecture(StrictModel):
    """The backbone and the kind of head every group gets (what the job config sets)."""

    backbone: BackboneConfig = Field(default_factory=BackboneConfig)
    head: HeadKind = Field(
        "attention",
        description="attention: channel-gated semantic embedding with spatial attention (robust to "
        "background clutter); pooled: global average pooling + linear, the baseline; spatial / channel: "
        "ablations with one of the two attentions removed",
    )
    embed_dim: int = Field(
        128, gt=0, description="semantic channels per position; 128 is ample for a few dozen labels"
    )
    num_maps: int = Field(
        2,
        ge=1,
        description="spatial attention maps per group; 2 lets a head look at two parts (collar and sleeve) "
        "while keeping the embedding small",
    )
    reduction: int = Field(
        4, ge=1, description="squeeze-and-excitation bottleneck ratio of the channel gate (SE-Net uses 4-16)"
    )


class GroupHead(StrictModel):
    """One group's head as built: its labels and the tap it reads."""

    name: str
    labels: list[str] = Field(..., min_length=1)
    depth: int | None = Field(None, ge=1, description="backbone tap counted from 1; None = the last")


class AttributeModelConfig(AttributeArchitecture):
    """Everything that rebuilds an attribute model: architecture plus the resolved groups and labels."""

    groups: list[GroupHead] = Field(..., min_length=1)

    @model_validator(mode="after")
    def _unique_groups(self) -> AttributeModelConfig:
        names = [g.name for g in self.groups]
        if len(set(names)) != len(names):
            raise ValueError(f"group names must be unique, got {names}")
        return self

    @property
    def label_names(self) -> list[str]:
        return [label for group in self.groups for label in group.labels]


class LossSection(StrictModel):
    """Which multi-label loss, and its imbalance knobs."""

    kind: Literal["bce", "asymmetric"] = Field(
        "bce",
        description="bce: binary cross-entropy, positives weighted by neg/pos (clipped); asymmetric: "
        "Ridnik et al.'s focusing loss for many easy negatives (try it when labels number in the hundreds)",
    )
    pos_weight: bool = Field(True, description="bce only: weight positives by negatives/positives per label")
    max_pos_weight: float = Field(
        10.0, ge=1.0, description="clip of that weight; rare labels otherwise dominate the gradient"
    )
    gamma_neg: float = Field(4.0, ge=0, description="asymmetric: negative focusing (the paper's 4)")
    gamma_pos: float = Field(0.0, ge=0, description="asymmetric: positive focusing (the paper's 0)")
    clip: float = Field(
        0.05, ge=0, lt=1, description="asymmetric: negative probability margin (the paper's 0.05)"
    )


class LabelSection(StrictModel):
    """Which attribute groups become labels, and how frequent a value must be to become one."""

    groups: list[AttributeGroupSpec] = Field(
        default_factory=fashion_groups,
        min_length=1,
        description="the fashion-products groups by default (gender, category, article type, colour, usage, "
        "season); each may set its head's depth",
    )
    min_count: int = Field(
        20,
        ge=1,
        description="training items a value needs to become a label; below ~20 a label cannot be learnt and "
        "its test AUC would rest on a handful of products",
    )


class SplitSection(StrictModel):
    """Held-out products: a hash of (seed, item_id), stable across runs and workers."""

    seed: int = Field(0, description="changes which products are held out")
    val_fraction: float = Field(0.1, ge=0, lt=1, description="products that choose the thresholds")
    test_fraction: float = Field(0.1, gt=0, lt=1, description="products the metrics are reported on")

    @model_validator(mode="after")
    def _leaves_training_data(self) -> SplitSection:
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError("val_fraction + test_fraction must leave at least 10% of products for training")
        return self


class AttributeTrainSection(common.TrainLoopSection):
    """Optimisation and bookkeeping of the loop."""

    steps: int = common.total_steps_field(2000)
    batch_size: int = Field(64, ge=1, description="per worker; 64 at 64 px is a fraction of a second on CPU")
    lr: float = Field(
        1e-3, gt=0, description="peak AdamW rate; 1e-3 suits a small ViT from scratch at batch 64"
    )
    min_lr: float = Field(1e-5, ge=0, description="end of the cosine decay")
    weight_decay: float = Field(0.05, ge=0, description="AdamW decay on matrices only, as for ViTs")
    warmup_steps: int = Field(50, ge=0, description="linear warm-up; ViTs diverge at full rate from step one")
    clip_grad_norm: float | None = Field(3.0, gt=0, description="gradient-norm clip against early spikes")
    freeze_blocks: int = common.freeze_blocks_field()
    checkpoint_every: int = common.checkpoint_every_field()
    keep_checkpoints: int = common.keep_checkpoints_field()
    log_every: int = common.log_every_field()
    validate_every: int = Field(
        100,
        ge=1,
        description="steps between val/macro_auc, val/micro_auc and val/map reports on the validation products "
        "(also at the last step; none when split.val_fraction is 0): what a sweep ranks trials by",
    )
    seed: int = Field(0, description="initialisation, batch order and augmentation")


VALIDATION_METRICS = ("val/macro_auc", "val/micro_auc", "val/map")


class EvalSection(StrictModel):
    """The held-out evaluation after training."""

    min_positives: int = Field(
        5,
        ge=1,
        description="test positives (and negatives) a label needs to be scored; others are listed as too "
        "few, not averaged in",
    )
    wild_backgrounds: str | None = Field(
        None,
        description="also score the test products pasted onto backgrounds: 'clutter' (generated) or a "
        "folder of photos (e.g. clothing-small/test); None skips it",
    )
    wild_seed: int = Field(0, description="which background and crop each product gets")
    batch_size: int = Field(256, ge=1, description="inference batch")


class AttributeTrainConfig(common.TrainingJobConfig):
    """The ``train_attributes`` job: a catalog whose rows carry the attributes in, attribute model artifact out."""

    job: Literal["train_attributes"] = "train_attributes"
    name: str = common.run_name_field("train-attributes")
    init_from: str | None = common.init_from_field()
    model: AttributeArchitecture = Field(default_factory=AttributeArchitecture)
    labels: LabelSection = Field(default_factory=LabelSection)
    split: SplitSection = Field(default_factory=SplitSection)
    loss: LossSection = Field(default_factory=LossSection)
    train: AttributeTrainSection = Field(default_factory=AttributeTrainSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    scaling: common.ScalingSection = Field(default_factory=common.ScalingSection)
