"""The train_fusion job on the session's Ray cluster: train, checkpoint, resume, publish, report; and the
loop's own steps in one process, which must beat the model's initial state.

A tiny catalog of drawn shapes (3 article types x 4 colours x 2 product lines), a 1-block ViT at 32 px,
a few steps: this checks the job's behaviour, not its quality (see benchmarks/fusion_quality.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_fusion_predict import TINY_BACKBONE, TINY_TEXT, write_shapes_catalog
from visuray.config import validate_config
from visuray.fusion.config import FusionTrainConfig
from visuray.fusion.datasets import TEMPLATED_TEXT_NOTE
from visuray.fusion.job import run_train_fusion
from visuray.storage import resolve_artifact

STEPS = 20  # enough for the in-process learning check below; a few seconds


def job_cfg(catalog: str, steps: int) -> FusionTrainConfig:
    return validate_config(
        FusionTrainConfig,
        {
            "name": "fusion-test",
            "catalog": catalog,
            "output": "model",
            "run_dir": "runs",
            "tokenizer": {"vocab_size": 120, "min_frequency": 1},
            "data": {"max_items": None, "test_fraction": 0.5, "val_fraction": 0.34, "seed": 0},
            "model": {
                "backbone": TINY_BACKBONE,
                "text": TINY_TEXT,
                "fusion": "maaf",
                "fusion_depth": 1,
                "fusion_width": 32,
                "fusion_heads": 2,
                "embed_dim": 16,
            },
            "train": {
                "steps": steps,
                "batch_size": 8,
                "warmup_steps": 1,
                "checkpoint_every": 2,
                "log_every": 1,
                "validate_every": 2,
            },
            "eval": {
                "ks": [1, 10, 50],
                "report_queries": 2,
                "report_top_k": 3,
                "cfq_candidates_per_group": 1,
            },
        },
    )


@pytest.mark.ray
def test_train_fusion_checkpoints_resumes_and_publishes(
    ray_cluster: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from visuray.fusion.predict import FusionPredictor

    # Relative paths, as in the shipped specs: the workers, whose working directory differs, must find them.
    monkeypatch.chdir(tmp_path)
    catalog = write_shapes_catalog("catalog")
    first = run_train_fusion(job_cfg(catalog, steps=4))
    assert first["steps"] == 4 and first["start_step"] == 0
    assert [h["step"] for h in first["history"]] == [1, 2, 3, 4]
    # Validation on held-out training product lines (what a sweep ranks trials by), every 2 steps.
    validated = [h for h in first["history"] if "val/fiq_score" in h]
    assert [h["step"] for h in validated] == [2, 4]
    assert all(0 <= h[k] <= 1 for h in validated for k in ("val/recall@1", "val/recall@10", "val/fiq_score"))
    for key in (
        "test/recall@1",
        "test/recall@10",
        "test/recall@50",
        "test/fiq_score",
        "test/cfq/caption_auc",
    ):
        assert 0.0 <= first["metrics"][key] <= 1.0, key
    assert any(k.startswith("test/category/") for k in first["metrics"])

    artifact = resolve_artifact(first["output"])
    assert artifact.manifest.kind == "fusion_model"
    assert {
        "model.safetensors",
        "fusion.yaml",
        "tokenizer.json",
        "config.yaml",
        "metrics.json",
        "report.html",
    } <= set(artifact.manifest.files)
    assert artifact.manifest.metadata["train_steps"] == 4
    assert json.loads(artifact.read("metrics.json")) == first["metrics"]
    report = artifact.read("report.html").decode()
    assert TEMPLATED_TEXT_NOTE in report and report.count("data:image/jpeg;base64,") >= 2 * (1 + 3)

    # Same name and run_dir, more steps: continues from the step-4 checkpoint.
    second = run_train_fusion(job_cfg(catalog, steps=6))
    assert second["start_step"] == 4 and second["steps"] == 6
    assert [h["step"] for h in second["history"]] == [5, 6]
    assert second["model_version"] != first["model_version"]

    predictor = FusionPredictor.load(second["output"], reference_catalog=catalog)
    query = predictor.encode_query("acme-shoes-red", "make it blue")
    assert query.vector.shape == (16,) and not query.notes


@pytest.mark.unit
def test_fusion_training_steps_beat_the_initial_state_on_the_training_queries(tmp_path: Path) -> None:
    """The loop's own steps, in one process: after a few of them the model ranks the training queries'
    targets higher than it did at initialisation. A model that never learns fails this."""
    import dataclasses

    import numpy as np
    import torch

    from visuray.fusion.data import ImageTensorCache, build_fusion_data, load_items, prepare_tokenizer
    from visuray.fusion.evaluate import evaluate
    from visuray.fusion.loop import build_objective, optimizer_for, train_steps

    catalog = write_shapes_catalog(str(tmp_path / "catalog"))
    cfg = job_cfg(catalog, steps=STEPS)
    items, texts = load_items(cfg.catalog, cfg.data)
    data = build_fusion_data(items, cfg.data)
    tokenizer = prepare_tokenizer(cfg, texts, data)
    cfg.model.text.vocab_size = tokenizer.vocab_size
    cache = ImageTensorCache(cfg.catalog, data.all_ids(), cfg.model.backbone.input_spec)
    torch.manual_seed(cfg.train.seed)
    objective = build_objective(cfg)
    # evaluate() ranks a split's queries against that split's items: here the training ones
    seen = dataclasses.replace(data, test_items=data.train_items, test_queries=data.train_queries)

    def mean_reciprocal_rank() -> float:
        ranks = evaluate(objective.model, cache, tokenizer, seen, cfg.eval).hit_ranks
        return float(np.mean(1.0 / (np.asarray(ranks, dtype=float) + 1.0)))

    before = mean_reciprocal_rank()
    optimizer = optimizer_for(objective, cfg.train)
    steps = train_steps(
        objective, optimizer, data.train_queries, cache, tokenizer, cfg.train, 0, torch.device("cpu"),
        lambda step, loss, lr: None,
    )  # fmt: skip
    after = mean_reciprocal_rank()
    assert steps == STEPS
    assert after > before + 0.1, (before, after)  # measured: 0.28 -> 0.77
