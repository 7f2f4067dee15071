"""The ``sweep`` job: Ray Tune over a training job, one Ray Train run per trial, early stopping with ASHA.

The current Ray pattern for tuning a Ray Train trainer: a ``ray.tune.Tuner`` runs a light driver function
per trial; the driver validates the trial's job config and calls the job's own runner (the same code as
``visuray run``), whose ``TorchTrainer`` reports to Tune through :mod:`visuray.sweep.tune_callback`. Every trial
trains in its own run (``<output>/<name>/train/<sweep>-<trial>``) and publishes its model to
``<output>/<name>/models/<trial>``; Tune's own state sits in ``<output>/<name>/``.

Before any trial starts the sweep is checked as a whole (:func:`visuray.sweep.prepare.prepare_sweep`): the job spec validates,
the job trains and reports the metric, every search key exists and its range is usable. Rerunning the
same sweep (same name and output) restores it: finished trials are kept, unfinished ones resume (their
training runs resume from their latest checkpoints).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import yaml

from visuray.config import (
    ConfigError,
    validate_config,
    without_credentials,
)
from visuray.errors import VisurayError
from visuray.sweep.config import SweepConfig
from visuray.sweep.prepare import PreparedSweep, prepare_sweep, trial_job_data

log = logging.getLogger(__name__)

SWEEP_FILE = "sweep.yaml"
DRIVER_MEMORY_BYTES = 256 * 2**20  # the sweep's config as started, to refuse resuming with a different one


class SweepInterrupted(VisurayError, RuntimeError):
    """The sweep ended (Ctrl-C, a lost driver) before every trial finished; rerunning resumes it."""


def _trial(config: dict[str, Any], prepared: PreparedSweep, root: str) -> None:
    """One trial's driver: validate its job config, then run the job (which reports to Tune)."""
    from ray import tune

    from visuray.sweep.tune_callback import metric_report_callback

    trial_id = tune.get_context().get_trial_id()
    data = trial_job_data(prepared, config, trial_id, root)
    job_cfg = validate_config(prepared.kind.config_model(), data, f"sweep trial {trial_id}")
    # The job's TorchTrainer forwards its reports of the sweep's metric to Tune through this callback.
    prepared.kind.run(job_cfg, callbacks=[metric_report_callback(prepared.cfg.metric)])


def _trial_dirname(trial: Any) -> str:
    return f"trial-{trial.trial_id}"


def trial_resources(job_cfg: Any) -> dict[str, float]:
    """Logical resources one trial's training run holds."""
    scaling = job_cfg.scaling
    out = {"CPU": scaling.num_workers * scaling.cpus_per_worker}
    if scaling.use_gpu:
        out["GPU"] = float(scaling.num_workers)
    return out


def concurrent_trials(cfg: SweepConfig, job_cfg: Any, cluster: dict[str, float]) -> int:
    """How many trials can train at once: the cluster's CPUs (and GPUs) over one trial's needs."""
    if cfg.max_concurrent_trials is not None:
        return cfg.max_concurrent_trials
    fits = [
        math.floor((cluster.get(name, 0.0) - (cfg.driver_cpus if name == "CPU" else 0.0)) / need)
        for name, need in trial_resources(job_cfg).items()
        if need > 0
    ]
    return max(1, min(fits or [1]))


def driver_resources(cpus: float) -> dict[str, float]:
    """What one trial's driver reserves. Tune refuses an empty reservation, so a driver without CPUs
    reserves a little of Ray's ``memory`` resource instead (it holds a few hundred MB in fact)."""
    return {"CPU": cpus} if cpus > 0 else {"CPU": 0, "memory": DRIVER_MEMORY_BYTES}


def _stored_sweep(root: str, options: Any) -> dict[str, Any] | None:
    from visuray.storage import exists, join, read_text

    file = join(root, SWEEP_FILE)
    return yaml.safe_load(read_text(file, options)) if exists(file, options) else None


def run_sweep(cfg: SweepConfig) -> dict[str, Any]:
    """Run (or resume) the sweep; write the results table, the best spec and the plots; return a summary."""
    import posixpath

    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import BasicVariantGenerator

    from visuray.cluster import ensure_ray
    from visuray.storage import absolute_uri, join, write_text
    from visuray.sweep.outputs import write_outputs
    from visuray.train.ray_job import ray_storage

    prepared = prepare_sweep(cfg)
    root = join(absolute_uri(cfg.output), cfg.name)  # a URI: what trials and outputs write to
    storage_path, storage_fs = ray_storage(cfg.output, cfg.storage)
    tune_path = posixpath.join(storage_path, cfg.name)  # the same place, as Tune addresses it
    wanted = without_credentials(cfg.model_dump(mode="json"))  # stored with the sweep: no secrets
    stored = _stored_sweep(root, cfg.storage)
    resuming = stored is not None and tune.Tuner.can_restore(tune_path, storage_filesystem=storage_fs)
    if resuming and stored != wanted:  # refused before a cluster starts
        raise ConfigError(
            f"sweep {cfg.name!r} at {root} was started with a different config; rerun it unchanged to "
            "resume, or give the new sweep another name"
        )
    ensure_ray()
    import ray

    trainable = tune.with_resources(
        tune.with_parameters(_trial, prepared=prepared, root=root), driver_resources(cfg.driver_cpus)
    )
    started = time.monotonic()
    if resuming:
        log.info("resuming sweep %s: finished trials are kept, unfinished ones continue", root)
        tuner = tune.Tuner.restore(
            tune_path,
            trainable=trainable,
            resume_unfinished=True,
            resume_errored=True,
            storage_filesystem=storage_fs,
        )
    else:
        concurrency = concurrent_trials(cfg, prepared.job_cfg, ray.cluster_resources())
        if cfg.scheduler.name == "asha":
            scheduler: Any = ASHAScheduler(
                time_attr="step",
                max_t=prepared.max_steps or 10**9,
                grace_period=cfg.scheduler.grace_period,
                reduction_factor=cfg.scheduler.reduction_factor,
                # A trial at its last step must end by itself: stopping it there would kill the driver
                # before the job publishes the trained model.
                stop_last_trials=False,
            )
        else:
            scheduler = FIFOScheduler()
        log.info(
            "sweep %s: %d trial(s) of %s, %d at a time, ranked by %s (%s), scheduler %s",
            cfg.name,
            cfg.num_samples,
            prepared.kind.name,
            concurrency,
            cfg.metric,
            cfg.mode,
            cfg.scheduler.name,
        )
        write_text(join(root, SWEEP_FILE), yaml.safe_dump(wanted, sort_keys=False), cfg.storage)
        tuner = tune.Tuner(
            trainable,
            param_space={key: spec.to_tune() for key, spec in cfg.search_space.items()},
            tune_config=tune.TuneConfig(
                metric=cfg.metric,
                mode=cfg.mode,
                scheduler=scheduler,
                # The generator itself caps concurrency (Tune ignores max_concurrent_trials beside it).
                search_alg=BasicVariantGenerator(random_state=cfg.seed, max_concurrent=concurrency),
                num_samples=cfg.num_samples,
                trial_dirname_creator=_trial_dirname,
            ),
            run_config=tune.RunConfig(
                name=cfg.name,
                storage_path=storage_path,
                storage_filesystem=storage_fs,
                failure_config=tune.FailureConfig(max_failures=0),
                verbose=1,
            ),
        )
    grid = tuner.fit()
    summary = write_outputs(grid, prepared, root)
    summary["wall_s"] = round(time.monotonic() - started, 1)
    if summary["unfinished"]:
        raise SweepInterrupted(
            f"sweep {cfg.name!r} stopped with {summary['unfinished']} of {summary['trials']} trial(s) unfinished "
            f"(results so far in {summary['results']}); rerun the same command to resume it"
        )
    return summary
