"""The finetune job: its pieces (losses from config, parameter groups, freezing, weak labels) without Ray,
then on the session's Ray cluster with DeepSpeed: it learns, publishes a loadable model, and resumes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.tiny import tiny_vit, tiny_vit_overrides
from visuray.catalog.schema import CatalogRecord, write_catalog
from visuray.config import validate_config
from visuray.images import decode_image, encode_jpeg, to_model_input
from visuray.metric_learning.config import FinetuneConfig, LossSection
from visuray.metric_learning.data import training_labels
from visuray.metric_learning.job import run_finetune
from visuray.metric_learning.loop import build_loss, finetune_param_groups, set_learning_rates
from visuray.metric_learning.losses import (
    AdaptiveTripletLoss,
    ContrastiveLoss,
    MultiSimilarityLoss,
    TripletMarginLoss,
)
from visuray.metric_learning.losses.mining import BatchAllMiner, SemiHardMiner
from visuray.models.backbone import freeze_first_blocks
from visuray.models.embedding import build_embedding_model, load_embedding_model
from visuray.train.schedules import lr_schedule

# Grey shifted by +-25 per channel: close enough that a random network does not already separate the
# classes (the loss starts well above 0), far enough to be learnt in ten steps.
COLOURS = [(153, 103, 128), (103, 153, 128), (128, 103, 153), (153, 153, 103)]


BRANDS = ["Roadster Cotton Crew", "Puma Sports Polo"]


def write_colour_catalog(uri: str, per_class: int = 6, size: int = 32, seed: int = 0) -> list[int]:
    """4 classes of noisy images whose class is their dominant colour (learnable in a few steps); titles
    name one of two product lines per class (for the fine-grained weak labels), categories pair classes."""
    rng = np.random.default_rng(seed)
    records, labels = [], []
    for label, colour in enumerate(COLOURS):
        for i in range(per_class):
            pixels = np.clip(np.array(colour) + rng.normal(0, 50, (size, size, 3)), 0, 255).astype(np.uint8)
            records.append(
                CatalogRecord(
                    item_id=f"c{label}-{i}",
                    image=encode_jpeg(Image.fromarray(pixels)),
                    label=f"class{label}",
                    category=f"group{label // 2}",
                    title=f"{BRANDS[i % 2]} Tshirt Shade{label}",
                )
            )
            labels.append(label)
    write_catalog(records, uri)
    return labels


def finetune_config(tmp_path: Path, **overrides: str) -> FinetuneConfig:
    data = {
        "catalog": str(tmp_path / "catalog"),
        "output": str(tmp_path / "model"),
        "run_dir": str(tmp_path / "runs"),
    }
    base = [
        "name=test",
        *tiny_vit_overrides(),
        "model.embedding_dim=16",
        "train.steps=10",
        "train.p=4",
        "train.k=3",
        "train.lr=1e-3",
        "loss.name=triplet",
        "loss.miner=batch_hard",
        "loss.margin=0.5",
        "train.warmup_steps=2",
        "train.log_every=1",
        "train.checkpoint_every=5",
        "train.data_workers=0",
        "scaling.max_failures=0",
    ]
    return validate_config(FinetuneConfig, data, "test", base + [f"{k}={v}" for k, v in overrides.items()])


# ---------------- pieces of the loop, without Ray ----------------

TINY_MODEL = {"backbone": tiny_vit(depth=3), "embedding_dim": 8}


def tiny_model() -> torch.nn.Module:
    from visuray.models.config import EmbeddingModelConfig

    torch.manual_seed(0)
    return build_embedding_model(EmbeddingModelConfig.model_validate(TINY_MODEL))


@pytest.mark.unit
@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"name": "triplet", "miner": "batch_all"}, (TripletMarginLoss, BatchAllMiner, "active")),
        ({"name": "triplet", "miner": "semi_hard"}, (TripletMarginLoss, SemiHardMiner, "mean")),
        ({"name": "adaptive_triplet"}, (AdaptiveTripletLoss, BatchAllMiner, "active")),
        ({"name": "multi_similarity"}, (MultiSimilarityLoss, None, None)),
        ({"name": "contrastive", "neg_margin": 0.7}, (ContrastiveLoss, None, None)),
    ],
)
def test_build_loss_from_config(overrides: dict, expected: tuple) -> None:
    loss = build_loss(LossSection.model_validate(overrides), semantic_distances=np.zeros((3, 3)))
    loss_class, miner_class, reduction = expected
    assert type(loss) is loss_class
    if miner_class is not None:
        assert type(loss.miner) is miner_class and loss.reduction == reduction
    if loss_class is ContrastiveLoss:
        assert loss.neg_margin == 0.7
    with pytest.raises(ValueError, match="semantic distances"):
        build_loss(LossSection(name="adaptive_triplet"))


@pytest.mark.unit
def test_layer_decay_scales_learning_rates_by_depth() -> None:
    model = tiny_model()
    groups, info = finetune_param_groups(model, weight_decay=0.05, layer_decay=0.5)
    named = {id(p): n for n, p in model.named_parameters()}
    scale_of = {
        named[id(p)]: meta.lr_scale for g, meta in zip(groups, info, strict=True) for p in g["params"]
    }
    assert set(scale_of) == set(named.values())  # every parameter in exactly one group
    assert scale_of["projection.weight"] == 1.0 and scale_of["backbone.norm.weight"] == 1.0
    assert scale_of["backbone.blocks.2.attn.qkv.weight"] == 0.5
    assert scale_of["backbone.blocks.0.attn.qkv.weight"] == 0.125
    assert scale_of["backbone.patch_embed.proj.weight"] == scale_of["backbone.pos_embed"] == 0.0625
    decay_of = {named[id(p)]: g["weight_decay"] for g in groups for p in g["params"]}
    assert (
        decay_of["backbone.blocks.0.attn.qkv.weight"] == 0.05
        and decay_of["backbone.blocks.0.norm1.bias"] == 0
    )

    set_learning_rates(groups, info, lr=1e-3, backbone_frozen=False)
    assert sorted({g["lr"] for g in groups}) == pytest.approx([6.25e-5, 1.25e-4, 2.5e-4, 5e-4, 1e-3])
    set_learning_rates(groups, info, lr=1e-3, backbone_frozen=True)
    assert {g["lr"] for g, m in zip(groups, info, strict=True) if m.backbone} == {0.0}
    assert {g["lr"] for g, m in zip(groups, info, strict=True) if not m.backbone} == {1e-3}


@pytest.mark.unit
def test_frozen_backbone_steps_leave_the_backbone_unchanged() -> None:
    model = tiny_model()
    groups, info = finetune_param_groups(model, weight_decay=0.05, layer_decay=None)
    optimizer = torch.optim.AdamW(groups, lr=1e-2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    set_learning_rates(optimizer.param_groups, info, lr=1e-2, backbone_frozen=True)
    loss = MultiSimilarityLoss()(model(torch.randn(8, 3, 32, 32)), torch.arange(8) // 2)
    loss.backward()
    optimizer.step()
    for name, param in model.named_parameters():
        changed = not torch.equal(before[name], param.detach())
        assert changed == (not name.startswith("backbone.")), name


@pytest.mark.unit
def test_freeze_first_blocks() -> None:
    model = tiny_model()
    freeze_first_blocks(model.backbone, 2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(
        n.startswith(("backbone.blocks.0.", "backbone.blocks.1.", "backbone.patch_embed")) for n in trainable
    )
    assert "backbone.cls_token" not in trainable and "backbone.blocks.2.mlp.fc1.weight" in trainable
    groups, _ = finetune_param_groups(model, 0.05, layer_decay=0.7)
    assert sum(len(g["params"]) for g in groups) == len(trainable)  # frozen ones are not optimised
    with pytest.raises(ValueError, match="only 3 blocks"):
        freeze_first_blocks(tiny_model().backbone, 4)


@pytest.mark.unit
def test_adaptive_triplet_trains_on_fine_classes_from_titles(tmp_path: Path) -> None:
    from visuray.catalog.readers import CatalogRows

    coarse = write_colour_catalog(str(tmp_path / "catalog"))
    rows = CatalogRows(str(tmp_path / "catalog"))
    plain = training_labels(rows, finetune_config(tmp_path))
    assert plain.labels == rows.labels and plain.semantic_distances is None
    cfg = finetune_config(tmp_path, **{"loss.name": "adaptive_triplet", "weak_labels.target_size": "3",
                                       "weak_labels.min_size": "3"})  # fmt: skip
    weak = training_labels(rows, cfg)
    assert weak.categories == rows.labels  # the coarse label plays the category
    assert len(set(weak.labels)) == 8  # two product lines (titles) in each of the 4 classes
    for fine in set(weak.labels):
        members = [i for i, f in enumerate(weak.labels) if f == fine]
        assert (
            len({coarse[i] for i in members}) == 1 and len({rows.titles[i].split()[0] for i in members}) == 1
        )
    assert weak.semantic_distances.shape == (8, 8)


def class_separation(model: torch.nn.Module, catalog: str, labels: list[int]) -> float:
    """Mean cosine distance between classes minus mean distance within classes (higher: better separated)."""
    from visuray.catalog.schema import iter_rows
    from visuray.storage import resolve_artifact

    images = [decode_image(row["image"]) for row in iter_rows(resolve_artifact(catalog), ["image"])]
    with torch.no_grad():
        emb = model.eval()(to_model_input(images, 32))
    distances = 1 - emb @ emb.T
    same = torch.tensor(labels)[:, None] == torch.tensor(labels)[None, :]
    off_diagonal = ~torch.eye(len(labels), dtype=torch.bool)
    return (distances[~same].mean() - distances[same & off_diagonal].mean()).item()


@pytest.mark.unit
def test_lr_schedule_warms_up_then_decays() -> None:
    schedule = lr_schedule(1.0, 0.0, steps=10, warmup_steps=2)
    assert schedule[:2] == [0.5, 1.0]
    assert schedule[2] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(schedule[2:], schedule[3:], strict=False))
    assert schedule[-1] == pytest.approx(0.5 * (1 + np.cos(np.pi * 7 / 8)))


@pytest.mark.ray
def test_finetune_learns_and_publishes_a_loadable_model(ray_cluster: object, tmp_path: Path) -> None:
    labels = write_colour_catalog(str(tmp_path / "catalog"))
    cfg = finetune_config(tmp_path)
    summary = run_finetune(cfg)

    assert summary["steps"] == 10 and summary["start_step"] == 0
    losses = [h["train/loss"] for h in summary["history"]]
    assert [h["step"] for h in summary["history"]] == list(range(1, 11))
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    assert summary["final_loss"] == pytest.approx(losses[-1])

    model, artifact = load_embedding_model(cfg.output)
    assert (
        summary["model_version"] == artifact.manifest.version == artifact.manifest.metadata["model_version"]
    )
    assert artifact.manifest.metadata["train_steps"] == 10
    assert b"job: finetune" in artifact.read("config.yaml")

    torch.manual_seed(cfg.train.seed)  # the same initialisation the workers started from
    initial = build_embedding_model(cfg.model)
    assert class_separation(model, cfg.catalog, labels) > class_separation(initial, cfg.catalog, labels) + 0.1


@pytest.mark.ray
@pytest.mark.slow
def test_finetune_resumes_from_the_latest_checkpoint(ray_cluster: object, tmp_path: Path) -> None:
    # The adaptive triplet loss on title clusters, category-favouring batches, a frozen first block,
    # layer-wise decay and a frozen backbone for the first steps, with ZeRO-1: all through one resume.
    write_colour_catalog(str(tmp_path / "catalog"))
    options = {
        "name": "resume",
        "train.checkpoint_every": "3",
        "loss.name": "adaptive_triplet",
        "weak_labels.target_size": "3",
        "weak_labels.min_size": "3",
        "train.single_category_prob": "0.5",
        "train.freeze_blocks": "1",
        "train.freeze_backbone_steps": "2",
        "train.layer_decay": "0.75",
        "model.backbone.depth": "2",
    }
    first = run_finetune(finetune_config(tmp_path, **{**options, "train.steps": "6"}))
    assert first["start_step"] == 0 and first["steps"] == 6

    second = run_finetune(finetune_config(tmp_path, **{**options, "train.steps": "10"}))
    assert second["start_step"] == 6 and second["steps"] == 10
    assert [h["step"] for h in second["history"]] == [7, 8, 9, 10]
    assert second["model_version"] != first["model_version"]
    model, artifact = load_embedding_model(str(tmp_path / "model"))
    assert artifact.manifest.version == second["model_version"]
    assert artifact.manifest.metadata["train_steps"] == 10
    assert artifact.manifest.metadata["loss"] == "adaptive_triplet"
    # The frozen first block is exactly the initial one; the trained blocks moved.
    torch.manual_seed(0)
    initial = build_embedding_model(finetune_config(tmp_path, **options).model)
    assert torch.equal(model.backbone.blocks[0].attn.qkv.weight, initial.backbone.blocks[0].attn.qkv.weight)
    assert not torch.equal(
        model.backbone.blocks[1].attn.qkv.weight, initial.backbone.blocks[1].attn.qkv.weight
    )

    # init_from: a new run starts from that published model. With both blocks frozen they must stay exactly
    # its blocks (block 1 trained above), not the seed's initialisation.
    third = run_finetune(
        finetune_config(
            tmp_path,
            **{
                **options,
                "name": "from-model",
                "output": str(tmp_path / "model-from-model"),
                "init_from": str(tmp_path / "model"),
                "train.freeze_blocks": "2",
                "train.steps": "3",
            },
        )
    )
    assert third["start_step"] == 0 and third["steps"] == 3
    started, _ = load_embedding_model(str(tmp_path / "model-from-model"))
    for block in (0, 1):
        assert torch.equal(
            started.backbone.blocks[block].attn.qkv.weight, model.backbone.blocks[block].attn.qkv.weight
        )


@pytest.mark.ray
@pytest.mark.s3
@pytest.mark.slow
def test_a_run_dir_on_s3_checkpoints_there_and_resumes_from_there(
    ray_cluster: object, s3_bucket: str, tmp_path: Path
) -> None:
    """What every multi-node run on a real cluster does: Ray Train keeps the run (checkpoints included) in
    object storage, and a rerun by name resumes from the checkpoint it finds there."""
    from visuray.storage import get_filesystem

    write_colour_catalog(str(tmp_path / "catalog"))
    run_dir = f"{s3_bucket}/train-runs"
    options = {
        "name": "on-s3",
        "run_dir": run_dir,
        "train.checkpoint_every": "3",
        "model.backbone.depth": "2",
        # Given explicitly: Ray's own processes (the Train controller) started before the test set the
        # loopback endpoint's credentials in this process's environment. On a cluster they come from the
        # nodes' environment or instance profile.
        "storage.key": "testing",
        "storage.secret": "testing",
    }
    first = run_finetune(finetune_config(tmp_path, **{**options, "train.steps": "6"}))
    assert first["start_step"] == 0 and first["steps"] == 6
    fs, path = get_filesystem(run_dir)
    stored = fs.find(path)
    run_path = f"{path}/on-s3/"
    checkpoints = {
        key[len(run_path) :].split("/")[0] for key in stored if key.startswith(run_path + "checkpoint_")
    }
    # steps 3 and 6, and the controller's record of them (what a restarted run resumes from)
    assert {name for name in checkpoints if "." in name and name.endswith(".json")} == {
        "checkpoint_manager_snapshot.json"
    }
    assert len(checkpoints) == 3, stored
    assert not (tmp_path / "runs").exists()  # nothing of the run kept locally

    second = run_finetune(finetune_config(tmp_path, **{**options, "train.steps": "8"}))
    assert second["start_step"] == 6 and second["steps"] == 8
    assert [h["step"] for h in second["history"]] == [7, 8]
