"""Connecting to Ray: the embedded local cluster, or the cluster a submitted job runs on; and stopping a
long-running command cleanly on SIGINT or SIGTERM.

Ray's token authentication (on by default for local clusters since Ray 2.59) stays on: ``ray.init()``
generates a token into ``~/.ray/auth_token`` for an embedded cluster, and a job submitted to a cluster
inherits ``RAY_ADDRESS`` and the cluster's token from its environment.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

log = logging.getLogger(__name__)

# Train V2 is the API Visuray is written against (ray.train.report / get_checkpoint semantics).
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")

# Ray Serve's throughput-optimised request path: each router replica also answers HTTP on a port of its
# own (30000 and up, see ``visuray.serving.direct_ingress_urls``), deployments call each other over gRPC,
# user code runs on the replica's own event loop. 2.8x the default path's /v1/search throughput on 2
# cores, 1.4x through the proxy (benchmarks/README.md, serve_latency.py). "0" turns it off. Every Ray
# node needs it (the KubeRay RayService sets it on each pod), and so does the process that deploys: the
# deployment handles it pickles into the application carry the transport it chose on importing ray.serve.
SERVE_ENV_DEFAULTS = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}

# Settings Ray reads from the environment when a process first imports it, so they must be in place
# before that import: in the process that starts an embedded cluster (every Ray process inherits them)
# and in the one that deploys the Serve application. ``apply_ray_env_defaults`` sets the ones not set.
RAY_ENV_DEFAULTS = {
    # A new embedded cluster's dashboard, which Ray Train needs to free stopped runs' resources, can take
    # over Ray's default 60 s to come up on a busy machine.
    "RAY_DASHBOARD_STARTUP_TIMEOUT_S": "180",
    # A router replica answering on its own port waits this long before it stops, so that load balancers
    # in front of it notice (Ray's default, 30 s, is right behind one: KubeRay's RayService keeps it). An
    # embedded cluster has none, and 30 s made every stop of `visuray serve` overrun the 30 s a stopping
    # service gets. In-flight requests are still finished first.
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
    **SERVE_ENV_DEFAULTS,
}


def apply_ray_env_defaults() -> None:
    """Put :data:`RAY_ENV_DEFAULTS` into this process's environment, keeping any value already set."""
    for name, value in RAY_ENV_DEFAULTS.items():
        os.environ.setdefault(name, value)


def serve_env_mismatch() -> str | None:
    """Why this process's Ray Serve runs another request path than its environment asks for, if it does.

    Ray Serve fixes the throughput-optimised mode when it is imported; a process that imported it before
    the variable was set builds deployment handles for the default path, which still work but forgo most
    of the mode's gain (half its throughput, measured) while the cluster's replicas run in the mode.
    """
    constants = sys.modules.get("ray.serve._private.constants")
    if constants is None:
        return None
    wanted = os.environ.get("RAY_SERVE_THROUGHPUT_OPTIMIZED") == "1"  # as Serve reads it: "1" or off
    imported = bool(getattr(constants, "RAY_SERVE_THROUGHPUT_OPTIMIZED", False))
    if wanted == imported:
        return None
    return (
        f"RAY_SERVE_THROUGHPUT_OPTIMIZED is {os.environ.get('RAY_SERVE_THROUGHPUT_OPTIMIZED')!r} but "
        f"ray.serve was imported when it was {'on' if imported else 'off'}: set it before importing Ray "
        "(visuray.cluster.apply_ray_env_defaults() does)"
    )


def ensure_ray(address: str | None = None, num_cpus: int | None = None, **kwargs: Any) -> None:
    """Initialise Ray once: connect to ``address`` (or ``RAY_ADDRESS``), else start an embedded cluster.

    ``num_cpus`` only applies to an embedded cluster; it is logical, so a small machine may declare
    more CPUs than it has cores to let a trainer, a data pool and Serve replicas be scheduled at once.
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    env_vars = {"RAY_TRAIN_V2_ENABLED": "1"}
    if address:
        log.info("connecting to the Ray cluster at %s", address)
        # Inside a submitted job the job's runtime env (which sets RAY_TRAIN_V2_ENABLED) already applies;
        # Ray refuses a driver runtime env that repeats its keys.
        ray.init(address=address, **kwargs)
    else:
        log.info("starting an embedded local Ray cluster")
        ray.init(**embedded_cluster_options(num_cpus, env_vars, **kwargs))


def embedded_cluster_options(
    num_cpus: int | None, env_vars: dict[str, str] | None = None, **kwargs: Any
) -> dict[str, Any]:
    """``ray.init`` arguments for a new embedded cluster whose dashboard its own processes can find.

    The dashboard's state API is how Ray Train's placement-group cleaner learns that a run's controller
    died (a sweep trial stopped early by ASHA, a killed driver); without it the run's placement group,
    and the CPUs it holds, stay reserved until the whole cluster goes away. The cleaner finds the API
    through ``RAY_API_SERVER_ADDRESS``: with several Ray instances on one machine (tests, notebooks) the
    auto-detection it otherwise falls back to can pick another instance's.
    """
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {
        "RAY_TRAIN_V2_ENABLED": "1",
        **(env_vars or {}),
        "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}",
    }
    return {
        "address": "local",  # a new embedded cluster, never one that `ray start` left on this machine
        "num_cpus": num_cpus,
        "include_dashboard": True,
        "dashboard_host": "127.0.0.1",
        "dashboard_port": port,
        "runtime_env": {"env_vars": env},
        **kwargs,
    }


def shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


# ------------------------------------------------------------------------------------ stopping cleanly
# Ctrl-C in a terminal, and what Kubernetes and systemd send to stop a service.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def wait_for_stop_signal(poll_s: float = 0.5) -> signal.Signals:
    """Block until SIGINT or SIGTERM arrives (main thread only); return which.

    Both are handled here, so neither interrupts the stop that follows halfway (Ray's own SIGTERM
    handling ends a driver with a native stack dump). Once one has arrived, a second one ends the
    process at once (exit 128 + its number): the way out if stopping hangs.
    """
    received: list[signal.Signals] = []

    def handle(signum: int, _frame: Any) -> None:
        if received:
            os._exit(128 + signum)
        received.append(signal.Signals(signum))

    for stop_signal in STOP_SIGNALS:
        signal.signal(stop_signal, handle)
    while not received:
        time.sleep(poll_s)  # handlers run between these sleeps
    return received[0]


def stop_within(
    steps: Sequence[tuple[str, Callable[[], object]]], timeout_s: float
) -> tuple[float, list[str]]:
    """Run the named stop ``steps`` in order in a helper thread, ``timeout_s`` for all of them; return the
    seconds taken and the names of the steps that had not finished (the one running, and those after)."""
    done: list[str] = []

    def run() -> None:
        for name, step in steps:
            try:
                step()
            except Exception:  # noqa: BLE001 - a failed step is reported; the next ones still run
                log.warning("stopping: %s failed", name, exc_info=True)
            done.append(name)

    started = time.monotonic()
    worker = threading.Thread(target=run, name="visuray-stop", daemon=True)
    worker.start()
    worker.join(timeout_s)
    return time.monotonic() - started, [name for name, _ in steps if name not in done]
