"""Backbones through timm's feature contract, and the embedding model's output."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.tiny import TINY_VIT
from visuray.models.backbone import backbone_kwargs, create_backbone
from visuray.models.config import BackboneConfig, EmbeddingModelConfig
from visuray.models.embedding import EmbeddingModel, build_embedding_model

pytestmark = pytest.mark.unit

VIT = BackboneConfig(**TINY_VIT)
CNN = BackboneConfig(name="resnet18", weights=None, img_size=32)


@pytest.mark.parametrize("backbone", [VIT, CNN], ids=["vit", "resnet18"])
@pytest.mark.parametrize("projection", ["linear", "mlp"])
def test_embeddings_are_unit_vectors_of_the_configured_size(
    backbone: BackboneConfig, projection: str
) -> None:
    torch.manual_seed(0)
    model = build_embedding_model(
        EmbeddingModelConfig(backbone=backbone, embedding_dim=24, projection=projection)
    )
    assert isinstance(model, EmbeddingModel)
    out = model(torch.randn(3, 3, 32, 32))
    assert out.shape == (3, 24)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(3))
    # Different images give different embeddings (the model is not collapsed at init).
    assert (out[0] - out[1]).abs().max() > 1e-4


def test_features_follow_timms_contract() -> None:
    model = build_embedding_model(EmbeddingModelConfig(backbone=VIT, embedding_dim=16))
    images = torch.randn(2, 3, 32, 32)
    backbone = model.backbone
    expected = backbone.forward_head(backbone.forward_features(images), pre_logits=True)
    torch.testing.assert_close(model.features(images), expected)
    assert expected.shape == (2, backbone.num_features)


def test_orthonormal_projection_starts_from_the_features_ranking() -> None:
    """projection_init orthonormal: at full width the embedding's inner products are the pooled
    features' cosines (training starts from the pretrained ranking); below it the rows are orthonormal
    and seeded; a random start keeps neither, and an mlp cannot start orthonormal."""
    images = torch.randn(5, 3, 32, 32)
    width = int(create_backbone(VIT).num_features)
    torch.manual_seed(3)
    full = build_embedding_model(
        EmbeddingModelConfig(backbone=VIT, embedding_dim=width, projection_init="orthonormal")
    ).eval()
    with torch.no_grad():
        features = torch.nn.functional.normalize(full.features(images), dim=-1)
        out = full(images)
    torch.testing.assert_close(out @ out.T, features @ features.T)

    def narrow(init: str, seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        cfg = EmbeddingModelConfig(backbone=VIT, embedding_dim=8, projection_init=init)
        return build_embedding_model(cfg).projection.weight.detach()

    weight = narrow("orthonormal", 3)
    torch.testing.assert_close(weight @ weight.T, torch.eye(8))
    torch.testing.assert_close(narrow("orthonormal", 3), weight)  # seeded by torch.manual_seed
    assert not torch.allclose(narrow("orthonormal", 4), weight)
    random = narrow("random", 3)
    assert not torch.allclose(random @ random.T, torch.eye(8), atol=0.1)
    with pytest.raises(ValueError, match="needs projection 'linear'"):
        build_embedding_model(
            EmbeddingModelConfig(
                backbone=VIT, embedding_dim=8, projection="mlp", projection_init="orthonormal"
            )
        )


def test_vit_size_knobs_reach_the_architecture() -> None:
    vit = create_backbone(VIT)
    assert len(vit.blocks) == 2
    assert vit.patch_embed.patch_size == (8, 8)
    assert vit.patch_embed.img_size == (32, 32)


def test_cnn_gets_no_vit_kwargs_and_vit_kwargs_on_a_cnn_are_a_clear_error() -> None:
    assert backbone_kwargs(CNN) == {"drop_path_rate": 0.0}
    with pytest.raises(ValueError, match="patch_size and model.backbone.depth to null"):
        create_backbone(BackboneConfig(name="resnet18", patch_size=8, depth=2))  # ViT settings left on


def test_unknown_backbone_name_is_an_error() -> None:
    with pytest.raises(ValueError, match="not a timm registry name"):
        create_backbone(BackboneConfig(name="vit_tinny_patch16_224"))


def test_importing_the_configs_does_not_import_torch() -> None:
    code = (
        "import sys; import visuray.models, visuray.checkpoint, visuray.metric_learning.config, visuray.ssl.config; "
        "import visuray.fusion.config, visuray.attributes.config; "
        "print(sorted(m for m in ('torch', 'timm', 'ray') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
