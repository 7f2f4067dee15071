"""Submitting job specs to a Ray cluster through the Ray Jobs API.

A submitted job carries everything it needs: the repository's ``jobs/`` and ``serve/`` folders as the
``working_dir``, the ``visuray`` library as a ``py_module``, the resolved spec (overrides applied and
validated here, before anything reaches the cluster) in an environment variable, and, on request, the
pinned requirements from ``constraints.txt``. The same spec therefore reproduces on any cluster.

Authentication: Ray's token authentication stays on. The Jobs client finds the token the way Ray does
(``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``); nothing here disables it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from visuray.config import config_to_yaml
from visuray.jobspec import load_job_spec

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

SPEC_ENV = "VISURAY_JOB_SPEC_YAML"
DEFAULT_DASHBOARD = "http://127.0.0.1:8265"
REPO_ROOT = Path(__file__).resolve().parents[2]
# Kept out of the uploaded working_dir: environments, outputs and caches are large and machine-specific.
WORKING_DIR_EXCLUDES = [
    ".venv",
    ".git",
    "runs",
    "demo-output",
    "**/__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    "platform",  # shipped separately as a py_module
    "benchmarks",
    "tests",
]


def dashboard_address(address: str | None = None) -> str:
    return address or os.environ.get("RAY_DASHBOARD_ADDRESS") or DEFAULT_DASHBOARD


def jobs_client(address: str | None = None) -> JobSubmissionClient:
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(dashboard_address(address))


def pinned_requirements(constraints: Path = REPO_ROOT / "constraints.txt") -> list[str]:
    lines = constraints.read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def build_submission(
    spec: str | Path, overrides: Sequence[str] = (), with_requirements: bool = False
) -> dict[str, Any]:
    """Validate the spec locally and return the ``submit_job`` keyword arguments."""
    kind, cfg = load_job_spec(spec, overrides)
    import visuray

    runtime_env: dict[str, Any] = {
        "working_dir": str(REPO_ROOT),
        "excludes": WORKING_DIR_EXCLUDES,
        "py_modules": [str(Path(visuray.__file__).parent)],
        "env_vars": {SPEC_ENV: config_to_yaml(cfg, keep_credentials=True), "RAY_TRAIN_V2_ENABLED": "1"},
    }
    if with_requirements:
        runtime_env["pip"] = {"packages": pinned_requirements(), "pip_check": False}
    return {
        "entrypoint": f"python {kind.script} --spec-from-env",
        "runtime_env": runtime_env,
        "metadata": {"visuray_job": kind.name, "visuray_name": str(getattr(cfg, "name", kind.name))},
    }


def submit(
    spec: str | Path,
    overrides: Sequence[str] = (),
    address: str | None = None,
    submission_id: str | None = None,
    with_requirements: bool = False,
    agent_wait_s: float = 60.0,
) -> str:
    kwargs = build_submission(spec, overrides, with_requirements)
    client = jobs_client(address)
    # A freshly started head answers before its job agent is up ("No available agent to submit job");
    # that state passes within seconds, so wait it out instead of failing the submission.
    deadline = time.monotonic() + agent_wait_s
    while True:
        try:
            return client.submit_job(submission_id=submission_id, **kwargs)
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(2)


TERMINAL_STATES = {"SUCCEEDED", "FAILED", "STOPPED"}


def wait_for(job_id: str, address: str | None = None, timeout: float = 3600, poll: float = 2.0) -> str:
    client = jobs_client(address)
    deadline = time.monotonic() + timeout
    while True:
        status = str(client.get_job_status(job_id).value)
        if status in TERMINAL_STATES:
            return status
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {status} after {timeout}s")
        time.sleep(poll)
