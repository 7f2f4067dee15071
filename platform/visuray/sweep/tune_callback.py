"""How a training job inside a sweep trial reports to Ray Tune.

A trial's driver runs the job's own runner (the same code as ``visuray run``) and hands it
:func:`metric_report_callback` for its ``TorchTrainer``. Only reports carrying the sweep's metric reach Tune:
a job also reports training losses every few steps, and Tune refuses a result without the metric it ranks
by (and early stopping must compare trials at the steps where the validation metric was computed, not at
whatever report came last).
"""

from __future__ import annotations

from typing import Any

from ray.tune.integration.ray_train import TuneReportCallback


class MetricReportCallback(TuneReportCallback):
    """Rank 0's reports that carry ``metric``, forwarded to Tune (with the checkpoint path)."""

    def __init__(self, metric: str) -> None:
        super().__init__()
        self.metric = metric

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        if metrics and self.metric in metrics[0]:
            super().after_report(run_context, metrics, checkpoint)


def metric_report_callback(metric: str) -> MetricReportCallback:
    """The Ray Train callback of a sweep trial's run, forwarding the reports of ``metric`` to Tune."""
    return MetricReportCallback(metric)
