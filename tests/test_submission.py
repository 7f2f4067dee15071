"""Job submission through the Ray Jobs API against a real `ray start --head` with token authentication."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.ray_head import RayHead

pytestmark = [pytest.mark.slow]
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture()
def head(ray_head: RayHead) -> RayHead:
    """The session's ``ray start`` head (see ``ray_head`` in conftest.py)."""
    return ray_head


def visuray(head: RayHead, *args: str, token: str | None = None, timeout: float = 300):
    return subprocess.run(
        [sys.executable, "-m", "visuray.cli", *args],
        cwd=REPO,
        env=head.client_env(token),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_submit_status_logs_list(head, tmp_path):
    out = tmp_path / "catalog"
    proc = visuray(
        head,
        "submit",
        "jobs/configs/ingest_clothing_small.yaml",
        f"output={out}",
        "--address",
        head.dashboard_url,
        "--submission-id",
        "visuray-test-ingest",
        "--wait",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.split()[0] == "visuray-test-ingest" and "SUCCEEDED" in proc.stdout
    # the job really ran on the cluster and published the catalog
    assert (out / "LATEST").exists()

    status = visuray(head, "status", "visuray-test-ingest", "--address", head.dashboard_url)
    assert status.returncode == 0, status.stderr
    info = json.loads(status.stdout)
    assert info["status"] == "SUCCEEDED" and info["metadata"]["visuray_job"] == "ingest"

    logs = visuray(head, "logs", "visuray-test-ingest", "--address", head.dashboard_url)
    assert logs.returncode == 0 and "num_ok" in logs.stdout

    listed = visuray(head, "list", "--address", head.dashboard_url)
    assert "visuray-test-ingest" in listed.stdout and "SUCCEEDED" in listed.stdout


def test_bad_spec_is_refused_before_submission(head, tmp_path):
    proc = visuray(
        head,
        "submit",
        "jobs/configs/ingest_clothing_small.yaml",
        "shard_rowz=3",
        "--address",
        head.dashboard_url,
    )
    assert proc.returncode == 2 and "shard_rowz (command line): unknown key" in proc.stderr
    listed = visuray(head, "list", "--address", head.dashboard_url)
    assert "shard_rowz" not in listed.stdout


def test_wrong_token_is_rejected(head):
    proc = visuray(head, "list", "--address", head.dashboard_url, token="not-the-token")
    assert proc.returncode != 0
    assert "Authentication" in proc.stderr or "authentication" in proc.stderr


def test_stop_a_running_job(head):
    import time

    ray_bin = str(Path(sys.executable).parent / "ray")
    job_id = "visuray-test-sleeper"
    subprocess.run(
        [ray_bin, "job", "submit", "--address", head.dashboard_url, "--submission-id", job_id, "--no-wait",
         "--", "python", "-c", "import time; time.sleep(300)"],
        env=head.client_env(), check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    proc = visuray(head, "stop", job_id, "--address", head.dashboard_url)
    assert proc.returncode == 0, proc.stderr
    for _ in range(60):
        status = json.loads(visuray(head, "status", job_id, "--address", head.dashboard_url).stdout)["status"]
        if status == "STOPPED":
            break
        time.sleep(1)
    assert status == "STOPPED"
