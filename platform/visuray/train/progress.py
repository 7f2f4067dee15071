"""What a person at the console sees of a training run: one progress display per run, on the driver.

Ray Train's workers and controller are other processes; their own output (Ray Train's per-report lines,
DeepSpeed's start-up chatter) goes to Ray's log files when the command line asks for a quiet console
(:func:`visuray.cluster.set_worker_logs_to_console`). What the console shows instead comes from here:
a Ray Train callback on the controller forwards each report (rank 0's step, loss, images/s, and the
checkpoint it wrote) and each worker error to a small actor, and the driver polls it and draws

* on a terminal, one line redrawn in place: ``finetune 'x' [#####.....] 10/20 loss 0.78 24 img/s ETA 0:12``;
* elsewhere (CI, a log file), the same as plain lines, one per report.

The display is off unless :func:`enable_progress` turned it on (the ``visuray`` command does): a library
caller or a test sees the workers' own lines, as before. Whatever is displayed or not, the driver keeps
the run's :class:`RunProgress`, so that a run stopped by a signal can say where it resumes from.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TextIO

# How often the driver asks the controller's reports; a report rarely comes faster than every 2 s.
POLL_S = 0.5
BAR_WIDTH = 20
PLAIN_EVERY_S = 10.0  # a plain-line display (CI, log files) says how far it got this often


@dataclass
class RunProgress:
    """The driver's view of one training run: how far it got and its latest persisted checkpoint."""

    label: str
    total_steps: int
    step: int | None = None
    start_step: int = 0
    loss: float | None = None
    images_per_s: float | None = None
    checkpoint_step: int | None = None
    checkpoint_path: str | None = None
    checkpointed: bool = False  # whether the latest report wrote a checkpoint
    errors: list[str] = field(default_factory=list)
    first_report: tuple[float, int] | None = None  # (when, step) of the first report, for the ETA

    def update(self, item: dict[str, Any]) -> None:
        """Take one forwarded event: a report (``metrics``, ``checkpoint``) or a worker ``error``."""
        if "error" in item:
            self.errors.append(item["error"])
            return
        metrics = item["metrics"]
        self.step = int(metrics["step"])
        self.start_step = int(metrics.get("start_step", self.start_step))
        self.loss = metrics.get("train/loss")
        self.images_per_s = metrics.get("train/images_per_s")
        self.checkpointed = bool(item.get("checkpoint"))
        if self.checkpointed:
            self.checkpoint_step, self.checkpoint_path = self.step, item["checkpoint"]
        if self.first_report is None:
            self.first_report = (time.monotonic(), self.step)  # when the driver saw it: one clock

    def eta_s(self, now: float | None = None) -> float | None:
        """Seconds left at the pace since the first report (None before two reports)."""
        if self.first_report is None or self.step is None:
            return None
        since, first_step = self.first_report
        done = self.step - first_step
        if done <= 0:
            return None
        elapsed = (now if now is not None else time.monotonic()) - since
        return elapsed / done * max(self.total_steps - self.step, 0)

    def line(self, with_bar: bool) -> str:
        """The progress as one line: with a ``[###...]`` bar on a terminal."""
        step = self.step if self.step is not None else self.start_step
        parts = [self.label]
        if with_bar:
            parts.append(bar(step / max(self.total_steps, 1)))
        parts.append(f"step {step}/{self.total_steps}")
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4f}")
        if self.images_per_s is not None:
            parts.append(f"{self.images_per_s:.1f} img/s")
        eta = self.eta_s()
        if eta is not None and step < self.total_steps:
            parts.append(f"ETA {format_duration(eta)}")
        if self.checkpointed:
            parts.append("(checkpoint)")
        return " ".join(parts)

    def resume_text(self) -> str:
        """Where a rerun with the same ``name`` and ``run_dir`` continues from."""
        if self.checkpoint_step is not None:
            return f"resumes from step {self.checkpoint_step} (checkpoint {self.checkpoint_path})"
        if self.start_step:
            return f"resumes from step {self.start_step} (the checkpoint it started from)"
        return "has no checkpoint yet: a rerun starts from step 0"


def bar(fraction: float) -> str:
    """``[#####...............]``: ``fraction`` (0 to 1) of :data:`BAR_WIDTH`."""
    filled = round(BAR_WIDTH * min(max(fraction, 0.0), 1.0))
    return "[" + "#" * filled + "." * (BAR_WIDTH - filled) + "]"


def redraw(stream: TextIO, text: str) -> None:
    """Replace the terminal's current line with ``text`` (no newline)."""
    stream.write("\r\x1b[2K" + text)


def format_duration(seconds: float) -> str:
    """``m:ss`` (or ``h:mm:ss``) for an ETA."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


@dataclass
class _Console:
    """The process-wide display settings, set by :func:`enable_progress`."""

    enabled: bool = False
    stream: TextIO | None = None
    interactive: bool = False
    last_run: RunProgress | None = None


_CONSOLE = _Console()


def enable_progress(stream: TextIO | None = None, interactive: bool | None = None) -> None:
    """Show a progress display for every training run this process starts, on ``stream`` (stderr), as a
    bar redrawn in place where ``interactive`` (default: the stream is a terminal), else as plain lines."""
    _CONSOLE.enabled = True
    _CONSOLE.stream = stream
    _CONSOLE.interactive = (stream or sys.stderr).isatty() if interactive is None else interactive


class ItemProgress:
    """A progress display for work counted in items (embedding a catalog): a bar redrawn in place on a
    terminal, elsewhere a plain line every :data:`PLAIN_EVERY_S` and at the end. Silent unless
    :func:`enable_progress` was called."""

    def __init__(self, label: str, total: int | None) -> None:
        self.label, self.total, self.done = label, total, 0
        self.started = self._last_line = time.monotonic()
        self.stream = _CONSOLE.stream or sys.stderr
        self.enabled, self.interactive = _CONSOLE.enabled, _CONSOLE.interactive

    def advance(self, items: int) -> None:
        self.done += items
        now = time.monotonic()
        if self.interactive or now - self._last_line >= PLAIN_EVERY_S:
            self._draw(now)

    def close(self) -> None:
        self._draw(time.monotonic(), final=True)

    def line(self, now: float) -> str:
        elapsed = max(now - self.started, 1e-9)
        parts = [self.label]
        if self.total:
            if self.interactive:
                parts.append(bar(self.done / self.total))
            parts.append(f"{self.done}/{self.total} items")
        else:
            parts.append(f"{self.done} items")
        parts.append(f"{self.done / elapsed:.1f} items/s")
        if self.total and 0 < self.done < self.total:
            parts.append(f"ETA {format_duration(elapsed / self.done * (self.total - self.done))}")
        return " ".join(parts)

    def _draw(self, now: float, final: bool = False) -> None:
        if not self.enabled:
            return
        self._last_line = now
        if self.interactive:
            redraw(self.stream, self.line(now) + ("\n" if final else ""))
        else:
            self.stream.write(self.line(now) + "\n")
        self.stream.flush()


def last_run() -> RunProgress | None:
    """The training run this process displayed last (or is displaying): how far it got."""
    return _CONSOLE.last_run


@contextmanager
def training_progress(trainer: Any, label: str, total_steps: int) -> Iterator[RunProgress | None]:
    """Around ``trainer.fit()``: when progress is enabled, forward the run's reports to the driver and
    display them; yields the run's :class:`RunProgress` (None when disabled)."""
    if not _CONSOLE.enabled:
        yield None
        return
    import ray

    progress = _CONSOLE.last_run = RunProgress(label, total_steps)
    inbox = ray.remote(num_cpus=0)(_Inbox).remote()
    callbacks = trainer.run_config.callbacks
    if callbacks is None:
        trainer.run_config.callbacks = callbacks = []
    callback = progress_callback(inbox)
    callbacks.append(callback)  # RunConfig's callbacks are read when fit() starts
    display = _Display(progress, inbox, _CONSOLE.stream or sys.stderr, _CONSOLE.interactive)
    display.start()
    try:
        yield progress
    finally:
        display.stop()
        callbacks.remove(callback)
        ray.kill(inbox)


class _Inbox:
    """A Ray actor: the controller's callback puts events, the driver takes them."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []

    def put(self, item: dict[str, Any]) -> None:
        self.items.append(item)

    def take(self) -> list[dict[str, Any]]:
        items, self.items = self.items, []
        return items


def progress_callback(inbox: Any) -> Any:
    """A Ray Train ``UserCallback`` (it runs on the controller) that forwards rank 0's reports and every
    worker error to ``inbox``; fire-and-forget, so a slow driver never holds training up."""
    from ray.train import UserCallback

    class ForwardProgress(UserCallback):
        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            if not metrics or "step" not in metrics[0]:
                return
            numbers = {k: v for k, v in metrics[0].items() if isinstance(v, (int, float))}
            item = {"metrics": numbers, "checkpoint": checkpoint.path if checkpoint else None}
            inbox.put.remote(item)

        def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
            for rank, exc in sorted(worker_exceptions.items()):
                inbox.put.remote({"error": f"worker {rank} failed: {exception_summary(exc)}"})

    return ForwardProgress()


def exception_summary(exc: BaseException) -> str:
    """``Type: message`` in one line, for the console: the message's last line, where Ray puts the root
    cause of an error it wraps."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    name = type(exc).__name__
    if not lines:
        return name
    return lines[-1] if lines[-1].split(":", 1)[0].endswith(name) else f"{name}: {lines[-1]}"


def training_failure_summary(exc: BaseException) -> str:
    """One line for a failed training run (Ray Train's ``TrainingFailedError``): the first failed
    worker's error, or the controller's."""
    failures: dict[int, BaseException] = getattr(exc, "worker_failures", None) or {}
    if failures:
        rank = min(failures)
        return f"worker {rank} of {len(failures)} failed: {exception_summary(failures[rank])}"
    controller = getattr(exc, "controller_failure", None)
    if controller is not None:
        return f"the run's controller failed: {exception_summary(controller)}"
    return exception_summary(exc)


class _Display:
    """The driver's polling thread: takes events from the inbox, updates the run, draws the line."""

    def __init__(self, progress: RunProgress, inbox: Any, stream: TextIO, interactive: bool) -> None:
        self.progress, self.inbox, self.stream, self.interactive = progress, inbox, stream, interactive
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="visuray-progress", daemon=True)
        self._drawn = False

    def start(self) -> None:
        self._write(f"{self.progress.label}: starting, {self.progress.total_steps} steps")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._poll()  # the last reports, which may have come after the thread's last look
        if self.interactive and self._drawn:
            self.stream.write("\n")
            self.stream.flush()

    def _run(self) -> None:
        while not self._stop.wait(POLL_S):
            self._poll()

    def _poll(self) -> None:
        import ray

        try:
            items = ray.get(self.inbox.take.remote(), timeout=10)
        except Exception:  # noqa: BLE001 - a display that cannot poll shows nothing; training goes on
            return
        for item in items:
            self.progress.update(item)
            if "error" in item:
                self._write(f"{self.progress.label}: {item['error']}", newline=True)
            elif not self.interactive:
                self._write(self.progress.line(with_bar=False))
        if items and self.interactive:
            self._write(self.progress.line(with_bar=True))

    def _write(self, text: str, newline: bool = False) -> None:
        if self.interactive and not newline:
            redraw(self.stream, text)
            self._drawn = True
        else:
            if self.interactive and self._drawn:
                self.stream.write("\n")
                self._drawn = False
            self.stream.write(text + "\n")
        self.stream.flush()
