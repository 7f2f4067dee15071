"""How a training job inside a sweep trial reports to Ray Tune.

A trial's driver runs the job's own runner (the same code as ``visuray run``); the job's
``TorchTrainer`` gets :func:`trial_callbacks` through :func:`visuray.train.ray_job.build_torch_trainer`.
Only reports carrying the sweep's metric reach Tune: a job also reports training losses every few steps,
and Tune refuses a result without the metric it ranks by (and early stopping must compare trials at the
steps where the validation metric was computed, not at whatever report came last).
"""

from __future__ import annotations

from typing import Any

_trial_metric: str | None = None  # set in a trial's driver process by set_trial_metric()


def set_trial_metric(metric: str | None) -> None:
    global _trial_metric
    _trial_metric = metric


def trial_callbacks() -> list[Any]:
    """Ray Train callbacks for a run started inside a sweep trial; none outside one."""
    if _trial_metric is None:
        return []
    from ray.tune.trainable.trainable_fn_utils import _in_tune_session

    if not _in_tune_session():
        return []
    return [_metric_report_callback(_trial_metric)]


def _metric_report_callback(metric: str) -> Any:
    from ray.tune.integration.ray_train import TuneReportCallback

    class MetricReportCallback(TuneReportCallback):
        """Rank 0's reports that carry ``metric``, forwarded to Tune (with the checkpoint path)."""

        def __init__(self) -> None:
            super().__init__()
            self.metric = metric

        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            if metrics and self.metric in metrics[0]:
                super().after_report(run_context, metrics, checkpoint)

    return MetricReportCallback()
