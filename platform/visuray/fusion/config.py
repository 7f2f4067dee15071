"""Configs of composed retrieval: the fusion model's architecture (what ``fusion.yaml`` in a fusion model
artifact rebuilds) and the ``train_fusion`` job's sections. Pydantic only, no torch: the CLI and job specs
import it."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from visuray.config import StrictModel
from visuray.models.config import BackboneConfig
from visuray.train import common

FusionName = Literal["maaf", "residual", "image_only", "text_only", "concat", "tirg"]


class TextEncoderConfig(StrictModel):
    """The small text transformer trained from scratch."""

    width: int = Field(128, gt=0, description="128 is plenty for catalog titles and short edits on CPU")
    depth: int = Field(
        2, ge=1, description="2 layers: modifying texts are short ('in red', 'shorter sleeves')"
    )
    heads: int = Field(4, ge=1, description="width / heads = 32 dims per head")
    max_length: int = Field(
        32,
        ge=3,
        description="context in tokens with [CLS] and [SEP]; two Fashion IQ captions fit in ~30, longer "
        "text is truncated and the predictor says so",
    )
    dropout: float = Field(0.1, ge=0, lt=1, description="usual transformer dropout; 0 for tiny tests")
    vocab_size: int = Field(
        2000, gt=4, description="set from the tokenizer by the job; 2000 word pieces cover catalog text"
    )

    @model_validator(mode="after")
    def _heads_divide_width(self) -> TextEncoderConfig:
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        return self


class FusionModelConfig(StrictModel):
    """Everything that rebuilds a fusion model's architecture."""

    backbone: BackboneConfig = Field(default_factory=BackboneConfig)
    text: TextEncoderConfig = Field(default_factory=TextEncoderConfig)
    fusion: FusionName = Field(
        "maaf",
        description="maaf or residual (the fusion models); image_only, text_only, concat, tirg are the "
        "baselines they are measured against",
    )
    fusion_depth: int = Field(
        2,
        ge=0,
        description="transformer layers over the joint image+text tokens (maaf needs >= 1; residual "
        "accepts 0: attention straight over the projected tokens); ignored by the baselines",
    )
    fusion_width: int = Field(128, gt=0, description="width of the joint tokens; 128 matches the text width")
    fusion_heads: int = Field(4, ge=1, description="attention heads in the fusion layers")
    fusion_dropout: float = Field(0.1, ge=0, lt=1, description="dropout in the fusion layers")
    residual_init_weight: float = Field(
        1.0,
        description="initial weight of the residual in residual fusion (learnable). 1.0 when the image "
        "encoder starts from random init; ~0.1 with a pretrained image encoder, so that the text at "
        "first only nudges a good image embedding",
    )
    fusion_gate: bool = Field(
        False,
        description="maaf / residual only: also scale the image embedding, dimension by dimension, by a "
        "gate read from the fused tokens (2 sigmoid(.), starting at 1), so the text can remove what it "
        "replaces as well as add what it asks for",
    )
    embed_dim: int = Field(128, gt=0, description="query/target embedding size, as the embedding models")

    @model_validator(mode="after")
    def _depth_fits_fusion(self) -> FusionModelConfig:
        if self.fusion == "maaf" and self.fusion_depth < 1:
            raise ValueError("fusion 'maaf' needs fusion_depth >= 1")
        if self.fusion_width % self.fusion_heads:
            raise ValueError(f"fusion_width {self.fusion_width} is not divisible by fusion_heads")
        return self


class TokenizerSection(StrictModel):
    """Where the tokenizer comes from."""

    path: str | None = Field(
        None,
        description="a tokenizer.json (path or s3://) to use as is; None trains one on the catalog's text "
        "(or takes text_init_from's, whose token ids the pretrained text encoder knows)",
    )
    vocab_size: int = Field(2000, gt=4, description="WordPiece vocabulary when training; ~2k covers titles")
    min_frequency: int = Field(2, ge=1, description="a piece must occur twice: drops typos and one-off codes")


class DataSection(StrictModel):
    """The composed queries built from the catalog's real attributes (templated text)."""

    kinds: list[Literal["type_colour", "colour_variant"]] = Field(
        default_factory=lambda: ["type_colour", "colour_variant"],
        description="'same article type, in <colour>' and product-line colour variants",
    )
    type_key: str = Field("articleType", description="attribute naming the kind of item (fashion-products)")
    colour_key: str = Field("baseColour", description="attribute naming the colour (fashion-products)")
    max_items: int | None = Field(
        3000, gt=0, description="catalog subset (whole product lines); None uses every item"
    )
    test_fraction: float = Field(
        0.2, gt=0, lt=1, description="product lines held out: their items are test references and gallery"
    )
    val_fraction: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="product lines of the training split held out for validation during training "
        "(val/recall@k, val/fiq_score: what a sweep ranks trials by); 0 trains on all of them",
    )
    type_colour_per_item: int = Field(1, ge=1, description="'in <colour>' queries per reference item")
    seed: int = Field(0, description="subset, split and template choice")


class FusionTrainSection(common.TrainLoopSection):
    steps: int = common.total_steps_field(300)
    batch_size: int = Field(
        64, ge=2, description="queries per worker step: the other 63 targets are each query's negatives"
    )
    lr: float = Field(5e-4, gt=0, description="peak AdamW rate; models start from scratch here")
    composer_lr_scale: float = Field(
        1.0,
        gt=0,
        description="learning-rate multiplier of the composer (the fusion module or baseline head on top of "
        "the encoders); the encoders keep ``lr``",
    )
    min_lr: float = Field(1e-6, ge=0, description="end of the cosine decay")
    weight_decay: float = Field(0.05, ge=0, description="on matrices only, as for ViTs")
    warmup_steps: int = Field(20, ge=0, description="linear warm-up; transformers need a gentle start")
    clip_grad_norm: float | None = Field(1.0, gt=0, description="guards the early, temperature-driven spikes")
    freeze_blocks: int = common.freeze_blocks_field()
    temperature: float = Field(
        0.07, gt=0, description="initial softmax temperature (CLIP's); learned from there"
    )
    learnable_temperature: bool = Field(True, description="False keeps the temperature fixed")
    flip: bool = Field(True, description="random horizontal flips: type and colour do not depend on them")
    checkpoint_every: int = common.checkpoint_every_field(100)
    keep_checkpoints: int = common.keep_checkpoints_field()
    log_every: int = common.log_every_field()
    validate_every: int = Field(
        50,
        ge=1,
        description="steps between val/* reports (also at the last step), when data.val_fraction > 0",
    )
    seed: int = Field(0, description="initialisation and batch order")


class EvalSection(StrictModel):
    ks: list[int] = Field(default_factory=lambda: [1, 10, 50], description="Recall@k cut-offs (Fashion IQ's)")
    exclude_reference: bool = Field(True, description="the reference is never the answer to an edit")
    cfq_candidates_per_group: int = Field(
        2, ge=0, description="CFQ-style labelled candidates per query and label group; 0 skips CFQ metrics"
    )
    report_queries: int = Field(6, ge=0, description="queries shown with their top results in report.html")
    report_top_k: int = Field(8, ge=1, description="results shown per report query")
    batch_size: int = Field(128, ge=1, description="images per forward pass when embedding the gallery")


class FusionTrainConfig(common.TrainingJobConfig):
    """The ``train_fusion`` job: a catalog with type and colour attributes in, fusion model artifact
    (weights, tokenizer, report) out."""

    job: Literal["train_fusion"] = "train_fusion"
    name: str = common.run_name_field("train-fusion")
    image_init_from: str | None = common.init_from_field("the image encoder")
    text_init_from: str | None = Field(
        None, description="fusion model artifact whose text encoder (and tokenizer) initialise this one"
    )
    tokenizer: TokenizerSection = Field(default_factory=TokenizerSection)
    data: DataSection = Field(default_factory=DataSection)
    model: FusionModelConfig = Field(default_factory=FusionModelConfig)
    train: FusionTrainSection = Field(default_factory=FusionTrainSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    scaling: common.ScalingSection = Field(default_factory=common.ScalingSection)


def validation_metric_names(cfg: FusionTrainConfig) -> set[str]:
    """``val/recall@k`` and (with k = 10 and 50) ``val/fiq_score``, when a validation split exists."""
    if cfg.data.val_fraction <= 0:
        return set()
    names = {f"val/recall@{k}" for k in cfg.eval.ks}
    return names | ({"val/fiq_score"} if {10, 50} <= set(cfg.eval.ks) else set())
