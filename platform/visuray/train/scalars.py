"""TensorBoard logs of training: :class:`ScalarLog` writes ``train/*`` scalars with
``torch.utils.tensorboard`` from rank 0."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class ScalarLog:
    """TensorBoard scalars of one training run (rank 0 only); a no-op when ``log_dir`` is None."""

    def __init__(self, log_dir: str | None) -> None:
        self.writer: Any = None
        if log_dir is None:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=log_dir)
        self.log_dir = log_dir

    def scalars(self, metrics: Mapping[str, Any], step: int) -> None:
        if self.writer is None:
            return
        for key, value in metrics.items():
            if isinstance(value, int | float) and key != "step":
                self.writer.add_scalar(key, float(value), step)
        self.writer.flush()  # a crash (or a killed worker) keeps what was logged so far

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
