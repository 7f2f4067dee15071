"""Job specs: a YAML file whose ``job:`` key names the job, validated into that job's config model.

The registry maps each job name to its config model, its runner in the library, and its thin entry
script in ``jobs/`` (what a cluster runs when the spec is submitted). Imports are lazy so that the CLI
stays fast and a CPU-only driver never imports a job's heavy dependencies just to list the jobs.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from visuray.config import ConfigError, read_yaml, validate_config


@dataclass(frozen=True)
class JobKind:
    name: str
    config: str  # "module:ConfigClass"
    runner: str  # "module:function" taking the validated config, returning a summary dict
    script: str  # entry script, relative to the repository root
    summary: str
    # "module:function" taking the validated config and returning the names of the metrics the job
    # reports during training (what a sweep can rank trials by); None for jobs that do not train.
    metrics: str | None = None
    # "module:function" taking the validated config and raising ConfigError on what would fail later
    # without needing Ray (a sweep's search space): run before a cluster starts or a job is submitted.
    precheck: str | None = None

    def config_model(self) -> type[BaseModel]:
        return _import(self.config)

    def run(self, cfg: BaseModel, callbacks: Sequence[Any] = ()) -> dict[str, Any]:
        """Run the job; ``callbacks`` (Ray Train callbacks) reach the trainer of a job that trains."""
        if callbacks:
            if self.metrics is None:
                raise ValueError(f"the {self.name} job does not train: it takes no Ray Train callbacks")
            return _import(self.runner)(cfg, callbacks=callbacks)
        return _import(self.runner)(cfg)

    def check(self, cfg: BaseModel) -> None:
        if self.precheck:
            _import(self.precheck)(cfg)

    def reported_metrics(self, cfg: BaseModel) -> set[str]:
        return set(_import(self.metrics)(cfg)) if self.metrics else set()


def _import(target: str) -> Any:
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


JOBS: dict[str, JobKind] = {
    job.name: job
    for job in [
        JobKind(
            "ingest",
            "visuray.catalog.ingest:IngestConfig",
            "visuray.catalog.ingest:run_ingest",
            "jobs/ingest.py",
            "image folder or images + metadata CSV -> sharded Parquet catalog",
        ),
        JobKind(
            "finetune",
            "visuray.metric_learning.config:FinetuneConfig",
            "visuray.metric_learning.job:run_finetune",
            "jobs/finetune.py",
            "train an embedding model with a metric loss on Ray Train",
            metrics="visuray.metric_learning.job:reported_metrics",
            precheck="visuray.metric_learning.job:precheck",
        ),
        JobKind(
            "pretrain",
            "visuray.ssl.config:PretrainConfig",
            "visuray.ssl.job:run_pretrain",
            "jobs/pretrain.py",
            "self-supervised DINO pretraining on Ray Train with DeepSpeed ZeRO",
            metrics="visuray.ssl.job:reported_metrics",
            precheck="visuray.ssl.job:precheck",
        ),
        JobKind(
            "build_index",
            "visuray.index.build:BuildIndexConfig",
            "visuray.index.build:run_build_index",
            "jobs/build_index.py",
            "embed a catalog with Ray Data and build a FAISS index",
        ),
        JobKind(
            "train_attributes",
            "visuray.attributes.config:AttributeTrainConfig",
            "visuray.attributes.job:run_train_attributes",
            "jobs/train_attributes.py",
            "train a multi-label attribute model (heads at chosen depths of one backbone) on Ray Train",
            metrics="visuray.attributes.job:reported_metrics",
            precheck="visuray.attributes.job:precheck",
        ),
        JobKind(
            "train_fusion",
            "visuray.fusion.config:FusionTrainConfig",
            "visuray.fusion.job:run_train_fusion",
            "jobs/train_fusion.py",
            "composed retrieval (image + modifying text) with MAAF / residual attention fusion on Ray Train",
            metrics="visuray.fusion.job:reported_metrics",
            precheck="visuray.fusion.job:precheck",
        ),
        JobKind(
            "sweep",
            "visuray.sweep.config:SweepConfig",
            "visuray.sweep.run:run_sweep",
            "jobs/sweep.py",
            "tune a training job's hyperparameters with Ray Tune (ASHA early stopping)",
            precheck="visuray.sweep.prepare:prepare_sweep",
        ),
    ]
}


def job_kind(name: str, source: str = "<spec>") -> JobKind:
    if name not in JOBS:
        raise ConfigError(
            f"invalid config in {source}:\n  job: unknown job {name!r}; known: {', '.join(JOBS)}"
        )
    return JOBS[name]


def load_job_spec(path: str | Path, overrides: Sequence[str] = ()) -> tuple[JobKind, BaseModel]:
    """Read a job spec, pick its job's config model from ``job:``, validate with overrides applied."""
    data = read_yaml(path)
    for item in overrides:
        if item.split("=", 1)[0].strip() == "job":
            data["job"] = item.split("=", 1)[1].strip()
    name = data.get("job")
    if not isinstance(name, str):
        raise ConfigError(f"invalid config in {path}:\n  job: missing; name one of {', '.join(JOBS)}")
    kind = job_kind(name, str(path))
    cfg = validate_config(kind.config_model(), data, str(path), overrides)
    kind.check(cfg)
    return kind, cfg
