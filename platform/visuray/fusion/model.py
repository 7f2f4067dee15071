"""The fusion model's builder and its artifact (save, load, pretrained parts); its config is in
:mod:`visuray.fusion.config`.

A fusion model artifact (kind ``fusion_model``) holds

- ``model.safetensors``: the :class:`~visuray.fusion.modules.FusionModel` state dict,
- ``fusion.yaml``: the :class:`~visuray.fusion.config.FusionModelConfig` that rebuilds it (vocabulary size included),
- ``tokenizer.json``: the tokenizer the text encoder was trained with,
- ``config.yaml`` (the job config), ``metrics.json`` and ``report.html`` when the job wrote them.

Pretrained parts: the image encoder's backbone starts from ``backbone.weights`` (the bundled ImageNet
weights by default, or any source :mod:`visuray.models.weights` takes; ``image_init_from`` is a model
artifact's backbone); the text encoder (and its tokenizer) from another fusion model artifact
(:func:`load_text_encoder_weights`). Both are local paths or ``s3://`` URIs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from visuray.fusion.config import FusionModelConfig
from visuray.storage import WEIGHTS_NAME, Artifact, StorageOptions

if TYPE_CHECKING:
    from torch import nn

    from visuray.fusion.tokenizer import TextTokenizer

FUSION_KIND = "fusion_model"
MODEL_CONFIG_NAME = "fusion.yaml"
TOKENIZER_NAME = "tokenizer.json"
TEXT_PREFIX = "text_encoder."


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
    from visuray.checkpoint import read_config

    return read_config(artifact, FusionModelConfig, MODEL_CONFIG_NAME)


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
