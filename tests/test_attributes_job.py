"""The train_attributes job on the session's Ray cluster: learns, evaluates, exports a model the predictor
loads (labels, thresholds, report, ROC figure), and resumes from its checkpoint."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from tests.tiny import tiny_vit_overrides
from visuray.attributes.config import AttributeTrainConfig
from visuray.attributes.export import load_attribute_model
from visuray.attributes.job import run_train_attributes
from visuray.attributes.predict import AttributePredictor
from visuray.catalog.schema import CatalogRecord, write_catalog
from visuray.config import validate_config
from visuray.images import encode_jpeg
from visuray.jobspec import load_job_spec

pytestmark = pytest.mark.ray

COLOURS = {"red": (200, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 200)}


def write_attribute_catalog(uri: str, per_colour: int = 24, size: int = 32) -> None:
    """Products on white: a coloured square (colour group) that is large or small (size group)."""
    rng = np.random.default_rng(0)
    records = []
    for colour, rgb in COLOURS.items():
        for i in range(per_colour):
            big = i % 2 == 0
            pixels = np.full((size, size, 3), 250, dtype=np.uint8)
            side = 24 if big else 12
            x, y = rng.integers(0, size - side + 1, 2)
            pixels[y : y + side, x : x + side] = rgb
            pixels = np.clip(pixels + rng.normal(0, 8, pixels.shape), 0, 255).astype(np.uint8)
            records.append(
                CatalogRecord(
                    item_id=f"{colour}-{i}",
                    image=encode_jpeg(Image.fromarray(pixels)),
                    label=colour,
                    attributes={"colour": colour, "size": "large" if big else "small"},
                )
            )
    write_catalog(records, uri)


def job_config(tmp_path: Path, *overrides: str) -> AttributeTrainConfig:
    data = {
        "catalog": str(tmp_path / "catalog"),
        "output": str(tmp_path / "model"),
        "run_dir": str(tmp_path / "runs"),
        "labels": {
            "min_count": 5,
            "groups": [
                {"name": "colour", "column": "colour", "depth": 1},
                {"name": "size", "column": "size"},
            ],
        },
    }
    base = [
        "name=test-attributes",
        *tiny_vit_overrides(),
        "model.embed_dim=16",
        "split.val_fraction=0.2",
        "split.test_fraction=0.25",
        "train.steps=10",
        "train.batch_size=16",
        "train.lr=3e-3",
        "train.warmup_steps=2",
        "train.log_every=1",
        "train.checkpoint_every=5",
        "train.validate_every=5",
        "eval.min_positives=3",
        "eval.wild_backgrounds=clutter",
        "scaling.max_failures=0",
    ]
    return validate_config(AttributeTrainConfig, data, "test", [*base, *overrides])


def test_the_shipped_configs_validate() -> None:
    for name in ("train_attributes_lite0.yaml", "train_attributes_lite0_baseline.yaml"):
        kind, cfg = load_job_spec(Path(__file__).parent.parent / "jobs" / "configs" / name)
        assert kind.name == "train_attributes" and isinstance(cfg, AttributeTrainConfig)
        assert [g.name for g in cfg.labels.groups] == [
            "gender", "category", "article_type", "colour", "usage", "season"
        ]  # fmt: skip


@dataclass
class TrainedRun:
    root: Path
    cfg: AttributeTrainConfig
    summary: dict[str, Any]


@pytest.fixture(scope="module")
def trained(ray_cluster: object, tmp_path_factory: pytest.TempPathFactory) -> TrainedRun:
    """One 10-step run for the module: the first test checks it and its model, the second resumes it (a run
    costs half a minute of start-ups on 2 cores)."""
    root = tmp_path_factory.mktemp("attributes")
    write_attribute_catalog(str(root / "catalog"))
    cfg = job_config(root)
    return TrainedRun(root, cfg, run_train_attributes(cfg))


def test_train_attributes_learns_and_exports_a_loadable_model(trained: TrainedRun) -> None:
    cfg, summary = trained.cfg, trained.summary
    assert summary["steps"] == 10 and summary["start_step"] == 0
    losses = [h["train/loss"] for h in summary["history"]]
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    # Validation (what sweeps rank trials by) every train.validate_every steps, on the validation products.
    validated = [h for h in summary["history"] if "val/macro_auc" in h]
    assert [h["step"] for h in validated] == [5, 10]
    assert all(0 <= h[m] <= 1 for h in validated for m in ("val/macro_auc", "val/micro_auc", "val/map"))
    assert sorted(summary["labels"]) == [
        "colour=blue",
        "colour=green",
        "colour=red",
        "size=large",
        "size=small",
    ]
    assert summary["test"]["num_evaluated"] + len(summary["test"]["too_few_positives"]) == 5
    assert summary["test_wild"]["num_evaluated"] == summary["test"]["num_evaluated"]

    model, model_cfg, labels, artifact = load_attribute_model(cfg.output)
    assert artifact.manifest.kind == "attribute_model"
    assert artifact.manifest.metadata["model_version"] == summary["model_version"]
    assert artifact.manifest.metadata["train_steps"] == 10
    assert set(artifact.manifest.files) >= {"model.safetensors", "model.yaml", "labels.json", "roc.png"}
    assert [g.depth for g in model_cfg.groups] == [1, None]
    assert set(labels["thresholds"]) == set(summary["labels"])
    evaluation = json.loads(artifact.read("evaluation.json"))
    assert evaluation["test"]["macro_auc"] == pytest.approx(summary["test"]["macro_auc"])
    assert evaluation["test_wild"]["backgrounds"] == "clutter"
    assert artifact.read("roc.png")[:4] == b"\x89PNG"

    predictor = AttributePredictor.load(cfg.output)
    red = Image.fromarray(np.full((32, 32, 3), COLOURS["red"], dtype=np.uint8))
    predictions = predictor.predict([red, encode_jpeg(red)])
    assert len(predictions) == 2 and set(predictions[0]) == set(summary["labels"])
    assert all(0.0 <= v <= 1.0 for v in predictions[0].values())
    assert predictions[0] == pytest.approx(predictions[1], abs=0.05)  # PIL and JPEG bytes agree
    positives = predictor.positives([red])[0]
    assert all(score >= predictor.thresholds[label] for label, score in positives.items())


@pytest.mark.slow
def test_train_attributes_resumes_from_the_latest_checkpoint(trained: TrainedRun) -> None:
    first = trained.summary
    assert first["start_step"] == 0 and first["steps"] == 10
    # The same name and run_dir with more steps continue the run from its last checkpoint (step 10); the
    # model goes elsewhere, so the first test's checks of the first model hold whichever test runs first.
    second = run_train_attributes(
        job_config(trained.root, "train.steps=13", f"output={trained.root / 'resumed'}")
    )
    assert second["start_step"] == 10 and second["steps"] == 13
    assert [h["step"] for h in second["history"]] == [11, 12, 13]
    assert second["model_version"] != first["model_version"]


@pytest.mark.slow
def test_train_attributes_starts_from_init_from(trained: TrainedRun) -> None:
    """init_from: a new run starts from the published attribute model's backbone. With every block frozen
    they stay exactly its (trained) blocks, not the seed's initialisation the first run started from."""
    output = trained.root / "from-model"
    summary = run_train_attributes(
        job_config(
            trained.root,
            "name=test-attributes-init-from",
            f"output={output}",
            f"init_from={trained.cfg.output}",
            "train.freeze_blocks=2",
            "train.steps=3",
            "train.warmup_steps=1",
            "train.checkpoint_every=3",
            "train.validate_every=3",
        )
    )
    assert summary["start_step"] == 0 and summary["steps"] == 3
    started, *_ = load_attribute_model(str(output))
    source, *_ = load_attribute_model(trained.cfg.output)
    for block in (0, 1):
        assert torch.equal(
            started.backbone.blocks[block].attn.qkv.weight, source.backbone.blocks[block].attn.qkv.weight
        )
