"""The ``sweep`` job's config: which training job spec to tune, over which keys, ranked by which metric."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from visuray.config import StrictModel
from visuray.storage import StorageOptions
from visuray.sweep.space import ParamSpec


class SchedulerSection(StrictModel):
    name: Literal["asha", "fifo"] = Field(
        "asha", description="asha: stop the worst trials at each rung (successive halving); fifo: run all out"
    )
    grace_period: int = Field(
        50,
        ge=1,
        description="training steps before the first rung: no trial is stopped earlier. Make it at least one "
        "validation interval, or a rung never sees a metric",
    )
    reduction_factor: float = Field(
        2.0, gt=1, description="at each rung only the best 1/reduction_factor of trials go on"
    )


class SweepConfig(StrictModel):
    """The ``sweep`` job: a training job spec plus a search space; a results table and the best spec out."""

    job: Literal["sweep"] = "sweep"
    name: str = Field(
        "sweep",
        min_length=1,
        description="sweep name; rerunning a sweep with the same name and output resumes it",
    )
    spec: str = Field(..., description="the training job spec to tune (a YAML path, e.g. jobs/configs/...)")
    overrides: list[str] = Field(
        default_factory=list,
        description="dotted key=value overrides applied to the spec in every trial (e.g. a shorter budget)",
    )
    output: str = Field(
        "./runs/sweeps",
        description="where the sweep lives: <output>/<name>/ holds Tune's state, every trial's training run "
        "and model, results.parquet/.csv, best.yaml and plots/",
    )
    storage: StorageOptions = Field(default_factory=StorageOptions)
    metric: str = Field(..., description="the reported metric trials are ranked by (e.g. val/map@r)")
    mode: Literal["max", "min"] = Field("max", description="whether a larger metric is better")
    num_samples: int = Field(8, ge=1, description="trials (with grid parameters: repeats of the whole grid)")
    seed: int = Field(0, description="seed of the random search: the same seed draws the same trials")
    search_space: dict[str, ParamSpec] = Field(
        ..., description="dotted job-config key -> how to draw its values (see visuray.sweep.space)"
    )
    scheduler: SchedulerSection = Field(default_factory=SchedulerSection)
    max_concurrent_trials: int | None = Field(
        None,
        ge=1,
        description="trials training at once; default: as many as the cluster's CPUs (GPUs) can hold, each "
        "trial needing its job's scaling.num_workers x cpus_per_worker",
    )
    driver_cpus: float = Field(
        0.0,
        ge=0,
        description="CPUs reserved for each trial's driver (it only launches and watches its Ray Train run)",
    )

    @model_validator(mode="after")
    def _known_spec_keys(self) -> SweepConfig:
        for key in self.search_space:
            if key in ("job", "name", "run_dir", "output"):
                raise ValueError(f"search_space: {key!r} is set by the sweep for each trial, not tunable")
        return self
