"""Model artifacts: safetensors round trip, checksums, strict loading, backbone initialisation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.tiny import TINY_VIT
from visuray.checkpoint import CheckpointError
from visuray.config import StrictModel
from visuray.models.config import BackboneConfig, EmbeddingModelConfig
from visuray.models.embedding import build_embedding_model, load_embedding_model, save_model
from visuray.models.weights import load_pretrained
from visuray.storage import ArtifactError, resolve_artifact

pytestmark = pytest.mark.unit

CFG = EmbeddingModelConfig(backbone=BackboneConfig(**TINY_VIT), embedding_dim=16)


class _JobCfg(StrictModel):
    job: str = "finetune"
    lr: float = 3e-4


def _model(cfg: EmbeddingModelConfig = CFG, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_embedding_model(cfg).eval()


def test_round_trip_gives_identical_outputs_and_metadata(tmp_path: Path) -> None:
    model = _model()
    artifact = save_model(str(tmp_path / "m"), model, CFG, job_cfg=_JobCfg(), metadata={"final_loss": 0.1})
    assert set(artifact.manifest.files) == {"model.safetensors", "model.yaml", "config.yaml"}
    meta = artifact.manifest.metadata
    assert meta["model_version"] == artifact.manifest.version
    assert meta["embedding_dim"] == 16 and meta["backbone"] == "vit_tiny_patch16_224"
    assert meta["task"] == "embedding" and meta["final_loss"] == 0.1 and meta["code_version"]
    assert b"lr: 0.0003" in artifact.read("config.yaml")

    loaded, resolved = load_embedding_model(str(tmp_path / "m"))
    assert resolved.manifest.version == artifact.manifest.version
    assert not loaded.training
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), model(images), rtol=0, atol=0)


def test_ddp_style_wrapper_is_unwrapped(tmp_path: Path) -> None:
    class Wrapper(torch.nn.Module):
        def __init__(self, module: torch.nn.Module) -> None:
            super().__init__()
            self.module = module

    model = _model()
    save_model(str(tmp_path / "m"), Wrapper(model), CFG)
    loaded, _ = load_embedding_model(str(tmp_path / "m"))
    torch.testing.assert_close(loaded.state_dict(), model.state_dict())


def test_corrupted_weights_are_refused(tmp_path: Path) -> None:
    artifact = save_model(str(tmp_path / "m"), _model(), CFG)
    weights = Path(artifact.uri) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF  # flip bits inside the last tensor
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="checksum mismatch for model.safetensors"):
        load_embedding_model(str(tmp_path / "m"))


def test_mismatching_architecture_names_the_keys(tmp_path: Path) -> None:
    artifact = save_model(str(tmp_path / "m"), _model(), CFG)
    # Rewrite model.yaml (and its checksum) to claim another embedding size: the weights no longer fit.
    other = CFG.model_copy(update={"embedding_dim": 8})
    from visuray.config import config_to_yaml
    from visuray.storage import sha256_bytes

    text = config_to_yaml(other).encode()
    (Path(artifact.uri) / "model.yaml").write_bytes(text)
    manifest_path = Path(artifact.uri) / "MANIFEST.json"
    manifest = resolve_artifact(artifact.uri).manifest
    manifest.files["model.yaml"] = {"sha256": sha256_bytes(text), "size": len(text)}
    manifest_path.write_text(manifest.to_json())
    with pytest.raises(
        CheckpointError, match=r"shape mismatch: projection.bias: checkpoint \(16,\) vs model \(8,\)"
    ):
        load_embedding_model(str(tmp_path / "m"))


def test_missing_and_unexpected_keys_are_errors(tmp_path: Path) -> None:
    save_model(str(tmp_path / "m"), _model(CFG.model_copy(update={"projection": "mlp"})), CFG)
    with pytest.raises(
        CheckpointError, match=r"missing: projection.bias, projection.weight; unexpected: projection.0"
    ):
        load_embedding_model(str(tmp_path / "m"))


def test_backbone_weights_initialise_another_head(tmp_path: Path) -> None:
    source = _model(seed=1)
    save_model(str(tmp_path / "ssl"), source, CFG)
    target = _model(CFG.model_copy(update={"embedding_dim": 32, "projection": "mlp"}), seed=2)
    projection_before = {k: v.clone() for k, v in target.projection.state_dict().items()}
    load_pretrained(target.backbone, CFG.backbone.model_copy(update={"weights": str(tmp_path / "ssl")}))
    torch.testing.assert_close(target.backbone.state_dict(), source.backbone.state_dict())
    torch.testing.assert_close(target.projection.state_dict(), projection_before)


def test_backbone_of_another_architecture_is_refused(tmp_path: Path) -> None:
    save_model(str(tmp_path / "ssl"), _model(), CFG)
    deeper = CFG.model_copy(update={"backbone": CFG.backbone.model_copy(update={"depth": 3})})
    with pytest.raises(CheckpointError, match="missing: blocks.2"):
        load_pretrained(
            _model(deeper).backbone, deeper.backbone.model_copy(update={"weights": str(tmp_path / "ssl")})
        )


def test_other_artifact_kinds_are_not_models(tmp_path: Path) -> None:
    from visuray.storage import ArtifactWriter

    with ArtifactWriter(str(tmp_path / "c"), "catalog") as writer:
        writer.write_text("labels.json", "{}")
    with pytest.raises(ArtifactError, match="'catalog' artifact, not a 'model'"):
        load_embedding_model(str(tmp_path / "c"))
