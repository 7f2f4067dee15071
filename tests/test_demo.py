"""The README's main command, end to end: `visuray demo` in a subprocess, as a newcomer runs it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import free_port

pytestmark = [pytest.mark.slow]
REPO = Path(__file__).resolve().parent.parent


def test_demo_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "visuray.cli", "demo", "--output", str(out), "--port", str(free_port()),
         "--steps", "20"],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    queries = re.findall(r"^query\s+(\S+)\s+\S+\s+-> (.+)$", proc.stdout, flags=re.M)
    assert len(queries) == 20  # 2 bundled query photos for each of the 10 classes
    for _, shown in queries:
        assert len(shown.split(", ")) == 5  # five neighbours, each "label(score)"
    report = (out / "report.html").read_text()
    assert report.count("<figure") == 20 * 6  # each query beside its five neighbours
    assert "raw pixels" in report and "random init" in report
    # the attribute stage ran, was served over HTTP (/v1/attributes) and is reported against its baseline
    assert "Attributes (held-out photos)" in report and "pooled baseline" in report
    assert proc.stdout.count("attributes: ") == 20
    # every artifact of the chain was published (manifest last)
    for artifact in ("catalog", "model", "index", "attributes/attribute-model"):
        assert (out / artifact / "LATEST").exists(), artifact
