"""The console's progress displays and one-line errors (visuray.train.progress), without a cluster."""

from __future__ import annotations

import io
import re

import pytest

from visuray.train import progress as progress_module
from visuray.train.progress import (
    ItemProgress,
    RunProgress,
    exception_summary,
    format_duration,
    training_failure_summary,
)

pytestmark = pytest.mark.unit


def report(step: int, checkpoint: str | None = None, **metrics: float) -> dict:
    return {"metrics": {"step": step, "train/loss": 0.5, **metrics}, "checkpoint": checkpoint}


def test_a_run_remembers_its_latest_checkpoint_and_says_where_it_resumes() -> None:
    run = RunProgress("finetune 'x'", total_steps=40)
    assert run.resume_text() == "has no checkpoint yet: a rerun starts from step 0"
    run.update(report(5, start_step=0))
    run.update(report(10, checkpoint="/runs/x/checkpoint_a"))
    run.update(report(15))  # a report without a checkpoint keeps the last one
    assert (run.step, run.checkpoint_step) == (15, 10)
    assert run.resume_text() == "resumes from step 10 (checkpoint /runs/x/checkpoint_a)"

    resumed = RunProgress("finetune 'x'", total_steps=40)
    resumed.update(report(12, start_step=10))  # resumed at 10, stopped before its first checkpoint
    assert resumed.resume_text() == "resumes from step 10 (the checkpoint it started from)"


def test_the_progress_line_shows_step_loss_throughput_eta_and_a_bar_only_on_a_terminal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [100.0]
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: now[0])
    run = RunProgress("pretrain 'p'", total_steps=100)
    run.update(report(10, **{"train/images_per_s": 24.04}))  # the first report, seen at 100 s
    now[0] = 130.0
    run.step = 40  # 30 steps in 30 s: 60 left take 60 s
    assert run.line(with_bar=False) == "pretrain 'p' step 40/100 loss 0.5000 24.0 img/s ETA 1:00"
    run.checkpointed = True
    assert run.line(with_bar=True).startswith("pretrain 'p' [########............] step 40/100")
    assert run.line(with_bar=True).endswith("(checkpoint)")


def test_durations_read_as_minutes_or_hours() -> None:
    assert [format_duration(s) for s in (0, 59.6, 61, 3725)] == ["0:00", "1:00", "1:01", "1:02:05"]


def test_item_progress_draws_plain_lines_sparingly_and_the_last_one_always(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [0.0]
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: now[0])
    stream = io.StringIO()
    monkeypatch.setattr(progress_module, "_CONSOLE", progress_module._Console(True, stream, False))
    items = ItemProgress("embedding the catalog", total=300)
    for _ in range(5):  # 5 batches within 5 s: no line yet
        now[0] += 1
        items.advance(20)
    assert stream.getvalue() == ""
    now[0] = 12.0
    items.advance(20)
    now[0] = 15.0
    items.advance(180)  # 3 s after the last line: none
    items.close()
    lines = stream.getvalue().splitlines()
    assert lines == [
        "embedding the catalog 120/300 items 10.0 items/s ETA 0:18",
        "embedding the catalog 300/300 items 20.0 items/s",
    ]


def test_item_progress_is_silent_unless_enabled(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = io.StringIO()
    monkeypatch.setattr(progress_module, "_CONSOLE", progress_module._Console(False, stream, False))
    items = ItemProgress("embedding", total=None)
    items.advance(10)
    items.close()
    assert stream.getvalue() == ""


class WorkerGroupErrorLike(Exception):
    """What Ray Train raises for a failed run: its own text, with the workers' errors by rank."""

    def __init__(self, failures: dict[int, BaseException]) -> None:
        super().__init__("Training failed due to worker errors:\n[Rank 0 Error Snippet]:\nTraceback ...")
        self.worker_failures = failures


def test_a_failed_run_is_one_line_naming_the_first_failed_worker_and_its_error() -> None:
    error = WorkerGroupErrorLike({1: ValueError("bad batch"), 0: FileNotFoundError("no catalog at x")})
    assert training_failure_summary(error) == "worker 0 of 2 failed: FileNotFoundError: no catalog at x"
    wrapped = RuntimeError("Traceback (most recent call last):\n  File ...\nvisuray.ArtifactError: gone")
    assert exception_summary(wrapped) == "RuntimeError: visuray.ArtifactError: gone"
    assert re.fullmatch(r"KeyError", exception_summary(KeyError()))
