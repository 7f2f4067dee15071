"""The fusion model's config (torch-free), its builder, and its artifact (save, load, pretrained parts).

A fusion model artifact (kind ``fusion_model``) holds

- ``model.safetensors``: the :class:`~visuray.fusion.modules.FusionModel` state dict,
- ``fusion.yaml``: the :class:`FusionModelConfig` that rebuilds it (vocabulary size included),
- ``tokenizer.json``: the tokenizer the text encoder was trained with,
- ``config.yaml`` (the job config), ``metrics.json`` and ``report.html`` when the job wrote them.

Pretrained parts: the image encoder's backbone starts from ``backbone.weights`` (the bundled ImageNet
weights by default, or any source :mod:`visuray.models.weights` takes; ``image_init_from`` is a model
artifact's backbone); the text encoder (and its tokenizer) from another fusion model artifact
(:func:`load_text_encoder_weights`). Both are local paths or ``s3://`` URIs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, Field, model_validator

from visuray.config import ConfigError, StrictModel, validate_config, yaml_load
from visuray.models.config import BackboneConfig
from visuray.storage import WEIGHTS_NAME, Artifact, StorageOptions

if TYPE_CHECKING:
    from torch import nn

    from visuray.fusion.tokenizer import TextTokenizer

FUSION_KIND = "fusion_model"
MODEL_CONFIG_NAME = "fusion.yaml"
TOKENIZER_NAME = "tokenizer.json"
TEXT_PREFIX = "text_encoder."

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


def build_fusion_model(cfg: FusionModelConfig) -> nn.Module:
    """The fusion model for ``cfg`` from random init (pretrained parts are loaded separately)."""
    from visuray.fusion.image_encoder import ImageEncoder
    from visuray.fusion.modules import FusionModel, build_composer
    from visuray.fusion.text_encoder import TextTransformer
    from visuray.models.backbone import create_backbone

    image_encoder = ImageEncoder(create_backbone(cfg.backbone))
    t = cfg.text
    text_encoder = TextTransformer(t.vocab_size, t.width, t.depth, t.heads, t.max_length, t.dropout)
    composer = build_composer(
        cfg.fusion,
        image_width=image_encoder.width,
        text_width=t.width,
        width=cfg.fusion_width,
        embed_dim=cfg.embed_dim,
        depth=cfg.fusion_depth,
        heads=cfg.fusion_heads,
        dropout=cfg.fusion_dropout,
        residual_init_weight=cfg.residual_init_weight,
        gate=cfg.fusion_gate,
    )
    return FusionModel(image_encoder, text_encoder, composer, cfg.embed_dim)


def save_fusion_model(
    uri: str,
    model: nn.Module,
    model_cfg: FusionModelConfig,
    tokenizer: TextTokenizer,
    job_cfg: BaseModel | None = None,
    extra_files: Mapping[str, str] | None = None,
    metadata: Mapping[str, Any] | None = None,
    options: StorageOptions | None = None,
) -> Artifact:
    """Publish ``model`` with its config and tokenizer as a new version of the artifact at ``uri``."""
    from visuray.checkpoint import publish_weights
    from visuray.models.config import input_metadata

    return publish_weights(
        uri,
        FUSION_KIND,
        model,
        model_cfg,
        task="composed_retrieval",
        described={
            "embedding_dim": model_cfg.embed_dim,
            "fusion": model_cfg.fusion,
            "fusion_depth": model_cfg.fusion_depth,
            "backbone": model_cfg.backbone.name,
            **input_metadata(model_cfg.backbone),
            "max_text_tokens": model_cfg.text.max_length,
        },
        job_cfg=job_cfg,
        metadata=metadata,
        files={TOKENIZER_NAME: tokenizer.to_json(), **dict(extra_files or {})},
        options=options,
        config_name=MODEL_CONFIG_NAME,
    )


def resolve_fusion_model(uri: str, options: StorageOptions | None = None) -> Artifact:
    from visuray.checkpoint import resolve_kind

    return resolve_kind(uri, FUSION_KIND, options)


def read_fusion_config(artifact: Artifact) -> FusionModelConfig:
    from visuray.checkpoint import CheckpointError

    data = yaml_load(artifact.read(MODEL_CONFIG_NAME).decode())
    try:
        return validate_config(FusionModelConfig, data or {}, f"{artifact.uri}/{MODEL_CONFIG_NAME}")
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None


def read_tokenizer(artifact: Artifact, max_length: int) -> TextTokenizer:
    from visuray.fusion.tokenizer import TextTokenizer

    return TextTokenizer.from_json(artifact.read(TOKENIZER_NAME).decode(), max_length)


def load_fusion_model(
    uri: str, options: StorageOptions | None = None
) -> tuple[nn.Module, FusionModelConfig, TextTokenizer, Artifact]:
    """Rebuild a published fusion model, load its verified weights strictly; eval mode, on CPU."""
    from visuray.checkpoint import load_state_dict_strict, tensors_from_bytes

    artifact = resolve_fusion_model(uri, options)
    cfg = read_fusion_config(artifact)
    model = build_fusion_model(cfg)
    load_state_dict_strict(model, tensors_from_bytes(artifact.read(WEIGHTS_NAME)), artifact.uri)
    return model.eval(), cfg, read_tokenizer(artifact, cfg.text.max_length), artifact


def load_text_encoder_weights(
    text_encoder: nn.Module, uri: str, options: StorageOptions | None = None
) -> Artifact:
    """Initialise ``text_encoder`` from the ``text_encoder.*`` tensors of the fusion artifact at ``uri``.

    The architecture (width, depth, context, vocabulary size) must match; use that artifact's tokenizer
    with it, since token ids only mean something under the tokenizer they were trained with.
    """
    from visuray.checkpoint import CheckpointError, load_state_dict_strict, tensors_from_bytes

    artifact = resolve_fusion_model(uri, options)
    tensors = tensors_from_bytes(artifact.read(WEIGHTS_NAME))
    picked = {k[len(TEXT_PREFIX) :]: v for k, v in tensors.items() if k.startswith(TEXT_PREFIX)}
    if not picked:
        raise CheckpointError(f"checkpoint {artifact.uri} holds no tensors under {TEXT_PREFIX!r}")
    load_state_dict_strict(text_encoder, picked, f"{artifact.uri} ({TEXT_PREFIX}*)")
    return artifact
