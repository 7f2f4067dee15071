"""Re-estimating BatchNorm statistics, the catalog sample it runs on, and the pretraining export using it."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from visuray.catalog.readers import read_shard_tables, sample_catalog_images
from visuray.catalog.schema import CatalogRecord, write_catalog
from visuray.config import validate_config
from visuray.images import encode_jpeg, encoded_image_batches
from visuray.models.backbone import create_backbone
from visuray.models.batchnorm import batchnorm_layers, reestimate_batchnorm
from visuray.models.embedding import BACKBONE_PREFIX, load_embedding_model, resolve_model
from visuray.ssl.config import PretrainConfig
from visuray.ssl.job import export_teacher_backbone

pytestmark = pytest.mark.unit


def conv_bn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=0.3), nn.ReLU())


def test_statistics_become_the_average_over_the_batches_and_nothing_else_changes() -> None:
    model = conv_bn()
    weights = copy.deepcopy(model.state_dict())
    batches = [torch.randn(5, 3, 8, 8) * 2 + 1 for _ in range(3)]
    assert reestimate_batchnorm(model, batches) == 15

    with torch.no_grad():
        outputs = [model[0](b) for b in batches]  # the BatchNorm layer's inputs, per batch
    channel_means = torch.stack([o.mean(dim=(0, 2, 3)) for o in outputs])
    channel_vars = torch.stack([o.var(dim=(0, 2, 3), unbiased=True) for o in outputs])
    bn = model[1]
    torch.testing.assert_close(bn.running_mean, channel_means.mean(0))
    torch.testing.assert_close(bn.running_var, channel_vars.mean(0))
    assert bn.momentum == 0.3 and not model.training
    for name, value in model.state_dict().items():
        if "running" not in name and "num_batches" not in name:
            assert torch.equal(value, weights[name]), name


def test_a_model_without_batchnorm_is_left_alone_and_an_empty_sample_is_refused() -> None:
    plain = nn.Sequential(nn.Conv2d(3, 4, 3))
    assert reestimate_batchnorm(plain, iter(())) == 0  # nothing to do, nothing read
    model = conv_bn()
    model[1].running_mean.fill_(2.0)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="no images"):
        reestimate_batchnorm(model, [])
    with pytest.raises(RuntimeError):  # a batch the model cannot take, after a good one
        reestimate_batchnorm(model, [torch.randn(2, 3, 8, 8), torch.randn(2, 5, 8, 8)])
    for name, value in model.state_dict().items():  # nothing lost either time
        assert torch.equal(value, before[name]), name
    assert model[1].momentum == 0.3


@pytest.fixture()
def catalog(tmp_path: Path) -> str:
    """20 images in shards of 6, 6, 6 and 2, each a flat colour that encodes its row."""
    records = [
        CatalogRecord(
            item_id=f"i{i}", image=encode_jpeg(Image.new("RGB", (24, 20), (10 * i, 255 - 10 * i, 90)))
        )
        for i in range(20)
    ]
    uri = str(tmp_path / "catalog")
    write_catalog(records, uri, shard_rows=6)
    return uri


def test_catalog_sample_is_seeded_spread_and_bounded(catalog: str) -> None:
    every = [b for t in read_shard_tables(catalog, columns=["image"]) for b in t["image"].to_pylist()]
    sample = sample_catalog_images(catalog, 9, seed=3)
    assert len(sample) == 9 and len(set(sample)) == 9 and set(sample) <= set(every)
    assert sample == sample_catalog_images(catalog, 9, seed=3)
    assert sample != sample_catalog_images(catalog, 9, seed=4)
    shard_of = {image: i // 6 for i, image in enumerate(every)}
    assert len({shard_of[image] for image in sample}) == 4  # from every shard, the small one included
    assert sorted(sample_catalog_images(catalog, 50)) == sorted(every)  # a small catalog: all of it


def cnn_pretrain_config(tmp_path: Path, catalog: str, *overrides: str) -> PretrainConfig:
    data = {
        "catalog": catalog,
        "output": str(tmp_path / "model"),
        "model": {"backbone": {"name": "resnet10t", "weights": None, "img_size": 32}},
    }
    return validate_config(PretrainConfig, data, "<test>", list(overrides))


def teacher_with_skewed_statistics(cfg: PretrainConfig) -> dict[str, torch.Tensor]:
    backbone = create_backbone(cfg.model.backbone)
    for layer in batchnorm_layers(backbone):  # what augmented crops could leave behind
        layer.running_mean.fill_(3.0)
        layer.running_var.fill_(0.25)
    return {BACKBONE_PREFIX + k: v for k, v in backbone.state_dict().items()}


def test_export_publishes_statistics_of_clean_catalog_images(tmp_path: Path, catalog: str) -> None:
    cfg = cnn_pretrain_config(tmp_path, catalog, "export.batchnorm_images=8", "train.seed=5")
    teacher = teacher_with_skewed_statistics(cfg)
    export_teacher_backbone(teacher, cfg, {"trained_by": "test"})
    published, artifact = load_embedding_model(cfg.output)

    reference = create_backbone(cfg.model.backbone)
    reference.load_state_dict({k[len(BACKBONE_PREFIX) :]: v for k, v in teacher.items()})
    images = sample_catalog_images(catalog, 8, seed=5)
    reestimate_batchnorm(reference, encoded_image_batches(images, 32))
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(published.backbone.state_dict()[name], value, msg=name)
    assert not torch.equal(
        published.backbone.state_dict()["bn1.running_mean"], teacher["backbone.bn1.running_mean"]
    )
    assert (
        artifact.manifest.metadata["batchnorm_statistics"]
        == "re-estimated on 8 catalog images (serving preprocessing)"
    )


def test_export_keeps_the_teachers_statistics_when_asked(tmp_path: Path, catalog: str) -> None:
    cfg = cnn_pretrain_config(tmp_path, catalog, "export.batchnorm_images=0")
    teacher = teacher_with_skewed_statistics(cfg)
    export_teacher_backbone(teacher, cfg, {})
    published, _ = load_embedding_model(cfg.output)
    for name, value in published.backbone.state_dict().items():
        assert torch.equal(value, teacher[BACKBONE_PREFIX + name]), name
    assert "augmented" in resolve_model(cfg.output).manifest.metadata["batchnorm_statistics"]
