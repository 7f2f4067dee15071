"""Session-wide fixtures: one embedded Ray cluster and one loopback S3 server per test session.

Both are real: Ray is started with ``ray.init()`` (token authentication as the installed Ray sets it up),
and S3 is moto's HTTP server in a subprocess, reached through s3fs over HTTP like any S3 endpoint.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from visuray.cluster import apply_ray_env_defaults

REPO_ROOT = Path(__file__).resolve().parent.parent
# What the CLI sets before Ray is first imported (Ray Serve's throughput-optimised path, a longer wait for
# a new cluster's dashboard), so that the tests run the request path users get. conftest is imported before
# any test module, so before any of them imports Ray.
apply_ray_env_defaults()
# A Ray Train worker's report() waits until the controller's next poll of the workers (every 2 s by default)
# has taken the previous one. The tests' runs are a few tiny steps reporting each step or two, so the default
# paces them at 2 s a report, most of a run's time; polling every 0.2 s makes them wait on work instead.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
# Ray Data's Parquet reader reads file footers in a pool of actors, 32 by default, a Python process each,
# started for every read (each training attempt's dataset, each index build). The tests' catalogs are a few
# small files: one reader does, and the CPU those process starts took (half of a pretraining run's) is freed.
os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1")
# Serve gives a new HTTP proxy 5 s per readiness check and kills it after 3 misses; on a loaded 2-core
# machine a proxy starting beside busy replicas has taken longer, and the app never got a proxy.
os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "30")
# Serve marks replicas that wait to be scheduled after 30 s by default; the test of that waits 3.
os.environ.setdefault("RAY_SERVE_SLOW_STARTUP_WARNING_S", "3")
os.environ.setdefault("RAY_SERVE_SLOW_STARTUP_WARNING_PERIOD_S", "3")
# These are inherited by every cluster the tests start (the session's, `ray start` heads, CLI subprocesses).


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """GPU tests skip cleanly on machines without CUDA; the tests on the shared ``ray start`` head run last."""
    # The head lives from the first test that asks for it to the end of the session: run those tests one
    # after another at the end (in their usual order), so that it does not idle through the rest of the suite.
    items.sort(key=lambda item: "ray_head" in getattr(item, "fixturenames", ()))
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except Exception:  # torch missing or broken: no GPU tests either way
        has_gpu = False
    if has_gpu:
        return
    skip = pytest.mark.skip(reason="no CUDA GPU on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[object]:
    """The one embedded Ray cluster of the test session.

    Logical CPUs are oversubscribed (8 on a 2-core machine) so that a Train controller, its workers, a
    Ray Data pool and Serve replicas can be scheduled at once; the tests keep the actual work tiny.
    """
    import ray

    from visuray.cluster import embedded_cluster_options

    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    # Always a new embedded cluster, even when a `ray start` cluster runs here; with its dashboard, so that
    # Ray Train frees the resources of runs whose controller died (sweep trials stopped early).
    ctx = ray.init(**embedded_cluster_options(8, log_to_driver=True))
    yield ctx
    try:
        from ray import serve

        serve.shutdown()
    except Exception:
        pass
    ray.shutdown()


@pytest.fixture(scope="session")
def killed_pretraining(ray_cluster: object, tmp_path_factory: pytest.TempPathFactory) -> object:
    """One DINO pretraining run whose worker is SIGKILLed three times, shared by two tests: the fault
    tolerance test checks its restarts, the pretraining test the model it published and resuming it by
    name. Each run costs a minute of start-ups (controller, workers, DeepSpeed, Ray Data) on 2 cores."""
    from tests.test_fault_tolerance import run_killed_thrice

    return run_killed_thrice(tmp_path_factory.mktemp("killed-pretraining"))


@pytest.fixture(scope="session")
def ray_head() -> Iterator[object]:
    """One real ``ray start --head`` (token authentication on) for the tests that submit to a cluster or join
    nodes to one (:mod:`tests.ray_head`); started by the first test that asks for it.

    Three CPUs and one ``train_slot`` (a custom resource that places one Train worker per node): what the
    multi-node test needs; the submission tests need less.
    """
    from tests.ray_head import start_head

    head = start_head(num_cpus=3, resources={"train_slot": 1})
    yield head
    head.stop()


@contextlib.contextmanager
def moto_server(log: Path, **env: str) -> Iterator[str]:
    """moto's S3 server on a free loopback port, in its own process, with ``env`` added; yields its URL."""
    port = free_port()
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
        )
    try:
        _wait_for_port(port)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A real S3 HTTP endpoint on loopback (moto's server mode) in its own process. Like moto by default, it
    takes any credentials."""
    log = tmp_path_factory.mktemp("s3") / "moto.log"
    with moto_server(log, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing") as endpoint:
        creds = {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_REGION": "eu-west-1",
            "AWS_ENDPOINT_URL": endpoint,
        }
        saved = {k: os.environ.get(k) for k in creds}
        os.environ.update(creds)
        yield {"endpoint_url": endpoint, "log": str(log)}
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="session")
def s3_server_checking_credentials(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A second loopback S3 endpoint that authenticates every request (moto's IAM checks on from the first
    request, and no user created): any access key is refused with 403, as a real store refuses a wrong one.
    Yields its URL."""
    log = tmp_path_factory.mktemp("s3-auth") / "moto.log"
    with moto_server(log, INITIAL_NO_AUTH_ACTION_COUNT="0") as endpoint:
        yield endpoint


@pytest.fixture()
def s3_bucket(s3_server: dict[str, str]) -> str:
    """A fresh bucket on the loopback S3 server; returns ``s3://<bucket>``."""
    import s3fs

    name = f"visuray-test-{uuid.uuid4().hex[:10]}"
    fs = s3fs.S3FileSystem(
        key="testing",
        secret="testing",
        client_kwargs={"endpoint_url": s3_server["endpoint_url"], "region_name": "eu-west-1"},
        skip_instance_cache=True,
    )
    fs.mkdir(name)
    return f"s3://{name}"
