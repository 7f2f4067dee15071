"""The Ray Train wiring every training job shares: where runs are stored and how a trainer is built.

Each job (pretrain, finetune, train_fusion, train_attributes) has a ``name``, a ``run_dir``, a
``storage`` section, a ``scaling`` section (workers, GPU, CPUs per worker, max failures) and
``train.keep_checkpoints`` (fields and sections in :mod:`visuray.train.common`); :func:`build_torch_trainer`
turns those into one ``TorchTrainer`` so that checkpointing and fault tolerance behave the same in every job,
and :func:`fit_checkpointed` runs it and checks its result the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from visuray.storage import StorageOptions, get_filesystem, is_remote


def ray_storage(run_dir: str, options: StorageOptions) -> tuple[str, Any]:
    """``(storage_path, storage_filesystem)`` for RunConfig: local paths made absolute; s3:// through the
    same s3fs settings (endpoint, keys) as every other artifact, wrapped for Arrow."""
    if not is_remote(run_dir):
        return str(Path(run_dir.removeprefix("file://")).expanduser().absolute()), None
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, path = get_filesystem(run_dir, options)
    return path, PyFileSystem(FSSpecHandler(fs))


def build_torch_trainer(
    loop: Callable[[dict[str, Any]], Any],
    loop_config: dict[str, Any],
    cfg: Any,
    extra_resources: Mapping[str, float] | None = None,
    datasets: dict[str, Any] | None = None,
    callbacks: Sequence[Any] = (),
) -> Any:
    """A ``TorchTrainer`` for a job config with name / run_dir / storage / scaling / train.keep_checkpoints.

    ``extra_resources`` are custom resources per worker (e.g. to pin workers to nodes); ``callbacks`` are
    Ray Train callbacks for the run (a sweep trial's forwards the metric reports to Ray Tune).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    storage_path, storage_filesystem = ray_storage(cfg.run_dir, cfg.storage)
    return TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=cfg.scaling.num_workers,
            use_gpu=cfg.scaling.use_gpu,
            resources_per_worker={"CPU": cfg.scaling.cpus_per_worker, **dict(extra_resources or {})},
        ),
        run_config=RunConfig(
            name=cfg.name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            failure_config=FailureConfig(max_failures=cfg.scaling.max_failures),
            callbacks=list(callbacks),
        ),
        datasets=datasets,
    )


def fit_checkpointed(trainer: Any, job: str, cfg: Any) -> tuple[Any, dict[str, Any]]:
    """Run ``trainer.fit()`` (it raises TrainingFailedError when the run fails) for the job config ``cfg``
    (its ``name`` and ``train.steps``), with a progress display where the command line turned one on
    (:mod:`visuray.train.progress`); return the ``Result`` and rank 0's return value (the loop's summary;
    empty when there is none).

    Result.metrics and Result.checkpoint describe the latest *checkpointed* report only (metrics reported
    without a checkpoint are not kept), so every job's loop checkpoints its last step: a result without a
    checkpoint is an error that names the ``job`` kind, the run's name and the run's path.
    """
    from visuray.cluster import run_stoppable
    from visuray.train.progress import training_progress

    with training_progress(trainer, f"{job} {cfg.name!r}", cfg.train.steps):
        result = run_stoppable(trainer.fit)
    if result.checkpoint is None:
        raise RuntimeError(f"{job} run {cfg.name!r} finished without a checkpoint at {result.path}")
    return result, dict(result.return_value or {})
