"""A sweep checked as a whole before any trial starts (:func:`prepare_sweep`: the job spec validates, the
job trains and reports the metric, every search key exists and its range is usable), and the job spec of
each trial (:func:`trial_job_data`). The sweep's driver (:mod:`visuray.sweep.run`) and its outputs
(:mod:`visuray.sweep.outputs`) both build on it."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from visuray.config import ConfigError, apply_overrides, apply_values, read_yaml, validate_config
from visuray.jobspec import JOBS, JobKind, job_kind
from visuray.sweep.config import SweepConfig
from visuray.sweep.space import check_space

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreparedSweep:
    cfg: SweepConfig
    kind: JobKind
    job_data: dict[str, Any]  # the spec with the sweep's overrides, before per-trial values
    job_cfg: Any  # job_data validated
    max_steps: int | None


def prepare_sweep(cfg: SweepConfig) -> PreparedSweep:
    """Everything that can fail without training fails here, with the key named."""
    data = read_yaml(cfg.spec)
    name = data.get("job")
    if not isinstance(name, str):
        raise ConfigError(f"invalid config in {cfg.spec}:\n  job: missing; name one of {', '.join(JOBS)}")
    kind = job_kind(name, cfg.spec)
    if kind.metrics is None:
        trainable = ", ".join(k for k, v in JOBS.items() if v.metrics)
        raise ConfigError(
            f"sweep: the {name} job does not train and cannot be swept; jobs that can: {trainable}"
        )
    job_data = apply_overrides(data, cfg.overrides)
    job_cfg = validate_config(kind.config_model(), job_data, cfg.spec, cfg.overrides)
    check_space(kind.config_model(), job_data, cfg.search_space, cfg.spec)
    reported = kind.reported_metrics(job_cfg)
    if cfg.metric not in reported:
        hint = ""
        if cfg.metric.startswith("val/"):
            hint = " (val/* metrics are reported only when the job's validation.catalog is set)"
        raise ConfigError(
            f"sweep: {name} never reports {cfg.metric!r}{hint}; it reports: {', '.join(sorted(reported))}"
        )
    train = getattr(job_cfg, "train", None)
    max_steps = getattr(train, "steps", None)
    if cfg.scheduler.name == "asha" and max_steps is not None and cfg.scheduler.grace_period >= max_steps:
        raise ConfigError(
            f"sweep: scheduler.grace_period ({cfg.scheduler.grace_period}) must be below the job's "
            f"train.steps ({max_steps}), or ASHA never stops a trial early"
        )
    if not cfg.metric.startswith("val/"):
        log.warning(
            "sweep ranks trials by %s, a training metric: it rewards fitting the training set", cfg.metric
        )
    return PreparedSweep(cfg, kind, job_data, job_cfg, max_steps)


def trial_job_data(
    prepared: PreparedSweep, params: dict[str, Any], trial_id: str | None, root: str
) -> dict[str, Any]:
    """The job spec of one trial (``trial_id``), or of the best config when ``trial_id`` is None: the
    trial's values applied; a trial also gets its own run name, run directory and model output."""
    values: dict[str, tuple[list[str], Any]] = {key: (key.split("."), v) for key, v in params.items()}
    if trial_id is not None:
        values |= {
            "name": (["name"], f"{prepared.cfg.name}-{trial_id}"),
            "run_dir": (["run_dir"], f"{root}/train"),
            "output": (["output"], f"{root}/models/{trial_id}"),
            "storage": (["storage"], prepared.cfg.storage.model_dump(mode="json")),
        }
    return apply_values(prepared.job_data, values)
