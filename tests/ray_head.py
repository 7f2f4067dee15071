"""A real Ray head started with ``ray start --head`` on loopback, with token authentication on.

One head serves the submission and the multi-node tests (the session fixture ``ray_head`` in conftest.py).
The head gets its own temp dir so that its processes can be found and ended without touching the test
session's embedded cluster (``ray stop`` would stop every Ray process on the machine).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.conftest import free_port


@dataclass
class RayHead:
    gcs_address: str
    dashboard_url: str
    token: str
    temp_dir: str
    proc: subprocess.Popen[bytes]

    def client_env(self, token: str | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token or self.token})
        env.pop("RAY_ADDRESS", None)
        return env

    def stop(self) -> None:
        _stop_process_tree(self.proc, self.temp_dir)


def _stop_process_tree(proc: subprocess.Popen[bytes], temp_dir: str) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        # a short grace: whatever is left is ended below anyway, and each node's wait adds to the suite
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
    # `ray start --block` does not always take its children with it: end what runs under our temp dir
    subprocess.run(["pkill", "-f", temp_dir], check=False)
    time.sleep(1)
    subprocess.run(["pkill", "-9", "-f", temp_dir], check=False)
    shutil.rmtree(temp_dir, ignore_errors=True)


@dataclass
class RayWorkerNode:
    """A second node joined to a :class:`RayHead` with ``ray start --address``; own temp dir and store."""

    temp_dir: str
    proc: subprocess.Popen[bytes]

    def stop(self) -> None:
        _stop_process_tree(self.proc, self.temp_dir)


def _own_ports() -> list[str]:
    """Fresh ports for every per-node agent: the test session's embedded cluster (and any other Ray on this
    machine) already holds the defaults (e.g. the dashboard agent's 52365), and a node whose agent cannot
    bind never accepts jobs ("No available agent to submit job")."""
    return [
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
    ]


def _resources_arg(resources: dict[str, float] | None) -> list[str]:
    return [f"--resources={json.dumps(resources)}"] if resources else []


def start_head(
    num_cpus: int = 2, timeout: float = 180.0, resources: dict[str, float] | None = None
) -> RayHead:
    ray_bin = str(Path(sys.executable).parent / "ray")
    temp_dir = tempfile.mkdtemp(prefix="vrh-", dir="/tmp")  # short: Ray's socket paths have a length limit
    token = secrets.token_hex(16)
    port, dash = free_port(), free_port()
    env = dict(os.environ)
    env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_TRAIN_V2_ENABLED": "1"})
    # Job entrypoints say `python`, as on any cluster image: make it this environment's interpreter.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("RAY_ADDRESS", None)
    log = open(Path(temp_dir) / "head.log", "wb")  # noqa: SIM115 - lives as long as the process
    proc = subprocess.Popen(
        [
            ray_bin, "start", "--head", "--block",
            f"--port={port}", f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1",
            "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}", "--include-dashboard=true",
            f"--temp-dir={temp_dir}", f"--ray-client-server-port={free_port()}", *_own_ports(),
            *_resources_arg(resources),
        ],
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )  # fmt: skip
    head = RayHead(f"127.0.0.1:{port}", f"http://127.0.0.1:{dash}", token, temp_dir, proc)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            head.stop()
            raise RuntimeError(f"ray start exited: {(Path(temp_dir) / 'head.log').read_text()[-2000:]}")
        try:
            resp = httpx.get(
                f"{head.dashboard_url}/api/version", headers={"Authorization": f"Bearer {token}"}, timeout=2
            )
            if resp.status_code == 200 and _job_agent_ready(head):
                return head
        except httpx.HTTPError:
            pass
        time.sleep(1)
    head.stop()
    raise RuntimeError("the Ray head did not come up in time")


def _job_agent_ready(head: RayHead) -> bool:
    """The dashboard answers before its job agent does; a first trivial job proves jobs can be submitted."""
    resp = httpx.post(
        f"{head.dashboard_url}/api/jobs/",
        json={"entrypoint": "true", "submission_id": f"readiness-{secrets.token_hex(4)}"},
        headers={"Authorization": f"Bearer {head.token}"},
        timeout=10,
    )
    return resp.status_code == 200


def start_worker_node(
    head: RayHead,
    num_cpus: int = 1,
    resources: dict[str, float] | None = None,
    object_store_bytes: int = 200 * 1024 * 1024,
    timeout: float = 180.0,
) -> RayWorkerNode:
    """Join a second node to ``head`` on this machine: its own temp dir (so :meth:`RayWorkerNode.stop` ends
    only its processes), its own object store, and ``resources`` (e.g. ``{"node_b": 1}``) to place work."""
    ray_bin = str(Path(sys.executable).parent / "ray")
    temp_dir = tempfile.mkdtemp(prefix="vrw-", dir="/tmp")
    log = open(Path(temp_dir) / "node.log", "wb")  # noqa: SIM115 - lives as long as the process
    proc = subprocess.Popen(
        [
            ray_bin, "start", "--block", f"--address={head.gcs_address}",
            "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}",
            f"--object-store-memory={object_store_bytes}", f"--temp-dir={temp_dir}", *_own_ports(),
            *_resources_arg(resources),
        ],
        stdout=log, stderr=subprocess.STDOUT, env=head.client_env(),
    )  # fmt: skip
    node = RayWorkerNode(temp_dir, proc)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            node.stop()
            raise RuntimeError(f"ray start exited: {(Path(temp_dir) / 'node.log').read_text()[-2000:]}")
        # printed by `ray start` once the raylet has registered with the head's GCS
        if "Ray runtime started" in (Path(temp_dir) / "node.log").read_text(errors="replace"):
            return node
        time.sleep(1)
    node.stop()
    raise RuntimeError("the worker node did not join the head in time")
