"""The finetune job on the session's Ray cluster: it learns, publishes a loadable model, and resumes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from visuray.catalog.schema import CatalogRecord, write_catalog
from visuray.checkpoint import load_embedding_model
from visuray.config import validate_config
from visuray.images import decode_image, encode_jpeg, to_model_input
from visuray.models.embedding import build_embedding_model
from visuray.train.finetune import FinetuneConfig, lr_schedule, run_finetune

pytestmark = pytest.mark.ray

# Grey shifted by +-25 per channel: close enough that a random network does not already separate the
# classes (the loss starts well above 0), far enough to be learnt in ten steps.
COLOURS = [(153, 103, 128), (103, 153, 128), (128, 103, 153), (153, 153, 103)]


def write_colour_catalog(uri: str, per_class: int = 6, size: int = 32, seed: int = 0) -> list[int]:
    """4 classes of noisy images whose class is their dominant colour (learnable in a few steps)."""
    rng = np.random.default_rng(seed)
    records, labels = [], []
    for label, colour in enumerate(COLOURS):
        for i in range(per_class):
            pixels = np.clip(np.array(colour) + rng.normal(0, 50, (size, size, 3)), 0, 255).astype(np.uint8)
            records.append(
                CatalogRecord(
                    item_id=f"c{label}-{i}", image=encode_jpeg(Image.fromarray(pixels)), label=f"class{label}"
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
        "model.backbone.img_size=32",
        "model.embedding_dim=16",
        "train.steps=10",
        "train.p=4",
        "train.k=3",
        "train.lr=1e-3",
        "train.margin=0.5",
        "train.warmup_steps=2",
        "train.log_every=1",
        "train.checkpoint_every=5",
        "train.data_workers=0",
        "scaling.max_failures=0",
    ]
    return validate_config(FinetuneConfig, data, "test", base + [f"{k}={v}" for k, v in overrides.items()])


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


def test_lr_schedule_warms_up_then_decays() -> None:
    schedule = lr_schedule(1.0, 0.0, steps=10, warmup_steps=2)
    assert schedule[:2] == [0.5, 1.0]
    assert schedule[2] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(schedule[2:], schedule[3:], strict=False))
    assert schedule[-1] == pytest.approx(0.5 * (1 + np.cos(np.pi * 7 / 8)))


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


@pytest.mark.slow
def test_finetune_resumes_from_the_latest_checkpoint(ray_cluster: object, tmp_path: Path) -> None:
    write_colour_catalog(str(tmp_path / "catalog"))
    first = run_finetune(
        finetune_config(tmp_path, **{"name": "resume", "train.steps": "6", "train.checkpoint_every": "3"})
    )
    assert first["start_step"] == 0 and first["steps"] == 6

    second = run_finetune(
        finetune_config(tmp_path, **{"name": "resume", "train.steps": "10", "train.checkpoint_every": "3"})
    )
    assert second["start_step"] == 6 and second["steps"] == 10
    assert [h["step"] for h in second["history"]] == [7, 8, 9, 10]
    assert second["model_version"] != first["model_version"]
    model, artifact = load_embedding_model(str(tmp_path / "model"))
    assert artifact.manifest.version == second["model_version"]
    assert artifact.manifest.metadata["train_steps"] == 10
