"""Connecting to Ray: the embedded local cluster, or the cluster a submitted job runs on.

Ray's token authentication (on by default for local clusters since Ray 2.59) stays on: ``ray.init()``
generates a token into ``~/.ray/auth_token`` for an embedded cluster, and a job submitted to a cluster
inherits ``RAY_ADDRESS`` and the cluster's token from its environment.
"""

from __future__ import annotations

import logging
import os
import sys
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
