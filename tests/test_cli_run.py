"""`visuray run` as a person at a console meets it: a spec with relative paths, run from its folder; one
progress display instead of Ray's and DeepSpeed's internals; Ctrl-C stops it cleanly and says where it
resumes from; the same command then resumes there."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.test_finetune import finetune_config, write_colour_catalog

pytestmark = pytest.mark.slow  # its own embedded cluster, in a subprocess

STEPS, CHECKPOINT_EVERY = 30, 5
PROGRESS = re.compile(rf"^finetune 'cli-run' step (\d+)/{STEPS} loss \d")
STOPPED = re.compile(r"^stopped on SIGINT .*: finetune 'cli-run' stopped at step \d+ of \d+; it resumes from step (\d+) \(checkpoint (\S+)\)")  # fmt: skip


def write_spec(folder: Path) -> Path:
    """A finetune spec whose catalog, output and run folder are relative to ``folder``."""
    cfg = finetune_config(
        folder,
        name="cli-run",
        **{
            "train.steps": str(STEPS),
            "train.checkpoint_every": str(CHECKPOINT_EVERY),
            "scaling.max_failures": "0",
        },
    )
    data = {"job": "finetune", **cfg.model_dump(mode="json")}
    data.update(catalog="./catalog", output="./model", run_dir="./runs")
    spec = folder / "finetune.yaml"
    spec.write_text(yaml.safe_dump(data))
    return spec


def test_visuray_run_shows_progress_stops_on_ctrl_c_and_resumes_where_it_said(tmp_path: Path) -> None:
    write_colour_catalog(str(tmp_path / "catalog"))
    spec = write_spec(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "visuray.cli", "run", spec.name]

    # Its own embedded cluster, in its own process group: Ctrl-C in a terminal signals the whole group.
    first = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    lines: list[str] = []
    try:
        assert first.stdout is not None
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            line = first.stdout.readline()
            if not line:
                break  # exited before a checkpoint
            lines.append(line.rstrip("\n"))
            if PROGRESS.match(line) and line.rstrip().endswith("(checkpoint)"):
                break
        assert any(line.endswith("(checkpoint)") for line in lines), "\n".join(lines[-40:])
        stopping = time.monotonic()
        os.killpg(first.pid, signal.SIGINT)
        rest, _ = first.communicate(timeout=60)
        took = time.monotonic() - stopping
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
    lines += rest.splitlines()
    output = "\n".join(lines)
    assert first.returncode == 0 and took < 30, (first.returncode, took, output[-3000:])

    # Progress lines, not Ray Train's per-report lines or worker-prefixed output.
    assert [line for line in lines if PROGRESS.match(line)], output[-3000:]
    assert "TrainingReport(" not in output and "(RayTrainWorker" not in output, output[-3000:]
    stopped = [m for m in map(STOPPED.match, lines) if m]
    assert len(stopped) == 1, output[-3000:]
    resume_step, checkpoint = int(stopped[0].group(1)), Path(stopped[0].group(2))
    assert resume_step >= CHECKPOINT_EVERY and resume_step % CHECKPOINT_EVERY == 0
    assert checkpoint.is_dir() and checkpoint.parent == tmp_path / "runs" / "cli-run"
    assert not (tmp_path / "model" / "LATEST").exists()  # a stopped run publishes nothing

    second = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    summary = json.loads(second.stdout)
    assert summary["start_step"] == resume_step and summary["steps"] == STEPS
    assert (tmp_path / "model" / "LATEST").exists()
