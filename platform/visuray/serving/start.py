"""Starting the Serve application on a running cluster: deploy it, wait until it answers, and find the
router replicas' own addresses (Ray Serve's direct ingress)."""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from typing import Any

from visuray.errors import VisurayError
from visuray.serving.args import ServeAppArgs

log = logging.getLogger(__name__)


def _serve_http_address(host: str, port: int) -> tuple[str, int]:
    """Where the running Serve instance really listens: a Serve started earlier keeps its own address."""
    from ray.serve.context import _get_global_client

    http = _get_global_client().get_serve_details().get("http_options") or {}
    actual = (str(http.get("host") or host), int(http.get("port") or port))
    if actual != (host, port):
        log.warning("Serve was already running on %s:%s; using it instead of %s:%s", *actual, host, port)
    if actual[0] in ("0.0.0.0", "::"):
        return "127.0.0.1", actual[1]  # listening on every interface: reach it on loopback
    return actual


# The application `visuray serve` and the demo deploy (Serve's application name and its route namespace).
APP_NAME = "visuray"


def direct_ingress_urls(name: str) -> list[str]:
    """The router replicas' own HTTP addresses when Ray Serve's direct ingress is on, else ``[]``.

    With ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1`` (or ``RAY_SERVE_ENABLE_DIRECT_INGRESS=1``) in the environment
    of every Ray node, each ingress (router) replica listens on a port of its own (30000 and up) and
    requests sent there skip the proxy actor; the proxy keeps answering on the configured port (head
    node only). Production puts a load balancer over these addresses (Serve's HAProxy mode does that).
    """
    import ray
    from ray.serve.context import _get_global_client

    # No public API lists the replicas' ports yet; the controller's target groups are what HAProxy reads.
    # Without direct ingress they hold only the proxies, in groups that name no application. (The flag is
    # read from the controller's answer, not this process's environment: a driver may have imported Serve
    # before the cluster's environment was set.)
    groups = ray.get(_get_global_client()._controller.get_target_groups.remote(name))
    here = ray.util.get_node_ip_address()
    return [
        f"http://{'127.0.0.1' if target.ip == here else target.ip}:{target.port}"
        for group in groups
        if group.app_name == name and str(group.protocol.value).upper() == "HTTP"
        for target in group.targets
    ]


class ServeAppDidNotStartError(VisurayError):
    """The Serve application failed to deploy, or its replicas waited too long to be scheduled; it has
    been deleted again."""


def start_serve_app(
    args: ServeAppArgs,
    host: str = "127.0.0.1",
    port: int = 8000,
    name: str = APP_NAME,
    timeout_s: float = 180.0,
    access_log: bool = True,
    route_prefix: str = "/",
    schedule_wait_s: float | None = None,
) -> str:
    """Deploy the application on the connected Ray cluster and return its base URL once /healthz answers.

    ``access_log=False`` keeps Serve's per-request log lines out of the console (the demo prints its own).
    An application that fails to deploy is deleted and raises :class:`ServeAppDidNotStartError` with
    Serve's reason. With ``schedule_wait_s``, so is one whose replicas still wait to be scheduled after
    that long (no node has what they ask for): the error names the deployments that wait, what each
    replica asks for, what the cluster has free, and the settings that fix it. Serve reports a replica
    as waiting once it has waited ``RAY_SERVE_SLOW_STARTUP_WARNING_S`` (30 s), so that is the earliest.

    Call :func:`visuray.cluster.ensure_ray` first. Serve's HTTP options are cluster-wide and fixed when
    Serve first starts: a Serve instance already running keeps its host and port.
    """
    from visuray.cluster import serve_env_mismatch

    mismatch = serve_env_mismatch()  # before this function's own import of ray.serve settles it
    if mismatch:
        log.warning("%s", mismatch)

    import httpx
    from ray import serve

    from visuray.serving.deployments import build_app

    logging_config = None if access_log else {"enable_access_log": False, "log_level": "WARNING"}
    serve.start(http_options={"host": host, "port": port}, logging_config=logging_config)
    host, port = _serve_http_address(host, port)
    base_url = f"http://{host}:{port}"
    healthz = f"{base_url}{route_prefix.rstrip('/')}/healthz"
    app = build_app(args)
    # serve.run returns once every replica runs, and waits as long as they wait to be placed: in a helper
    # thread, so that this one can watch Serve's status meanwhile.
    failed: list[BaseException] = []
    deployer = threading.Thread(
        target=_deploy, args=(app, name, route_prefix, logging_config, failed), name="visuray-deploy", daemon=True
    )  # fmt: skip
    started = time.monotonic()
    deployer.start()
    last_error = "its replicas are not running yet"
    while time.monotonic() < started + timeout_s:
        if failed:
            serve.delete(name)
            reason = " ".join(str(failed[0]).split())
            raise ServeAppDidNotStartError(f"Serve application {name!r} did not start: {reason}")
        if not deployer.is_alive():
            try:
                if httpx.get(healthz, timeout=5).status_code == 200:
                    log.info("Serve application %r answers at %s", name, base_url)
                    return base_url
                last_error = "healthz did not answer 200"
            except httpx.HTTPError as exc:
                last_error = str(exc)
        waited = time.monotonic() - started
        problem = deploy_problem(name, args, schedule_wait_s is not None and waited >= schedule_wait_s)
        if problem:
            serve.delete(name)
            raise ServeAppDidNotStartError(f"Serve application {name!r} did not start: {problem}")
        time.sleep(0.5)
    raise TimeoutError(f"Serve application {name!r} did not answer {healthz} in {timeout_s}s: {last_error}")


def _deploy(app: Any, name: str, route_prefix: str, logging_config: Any, failed: list[BaseException]) -> None:
    from ray import serve

    try:
        serve.run(app, name=name, route_prefix=route_prefix, logging_config=logging_config)
    except Exception as exc:  # noqa: BLE001 - handed to the watching thread
        failed.append(exc)


# What Serve's status message says of replicas that no node can take yet (Ray 2.x wording).
_WAITING = re.compile(
    r"has (\d+) replicas that have taken more than \d+s to be scheduled.*?"
    r"Resources required for each replica: (\{.*?\}), total resources available: (\{.*?\})",
    re.S,
)


def deploy_problem(name: str, args: ServeAppArgs, check_scheduling: bool) -> str | None:
    """Why application ``name`` cannot start, from Serve's status, in one line; None while it may still.

    A failed deployment always counts; replicas waiting to be scheduled only when ``check_scheduling``.
    """
    from ray import serve

    status = serve.status().applications.get(name)
    if status is None:
        return None
    if status.status == "DEPLOY_FAILED":
        return " ".join(str(status.message).split()) or "its deployment failed (see Ray's Serve logs)"
    if not check_scheduling:
        return None
    waiting = []
    free: dict[str, float] = {}
    for deployment, info in status.deployments.items():
        found = _WAITING.search(str(info.message))
        if not found:
            continue
        asks, free = json.loads(found.group(2)), json.loads(found.group(3))
        # Replicas that merely start slowly (worker processes coming up on a busy machine) are reported
        # the same way; only those asking for more than the cluster has free cannot be placed.
        if any(amount > free.get(resource, 0.0) + 1e-9 for resource, amount in asks.items()):
            waiting.append(f"{deployment} ({found.group(1)} replica(s), each asking {found.group(2)})")
    if not waiting:
        return None
    import ray

    fix = args.fit_problem(ray.cluster_resources()) or (
        "other applications or jobs hold the rest (`ray status`): free it, lower the deployments' num_cpus "
        "(e.g. --set embedder.num_cpus=0.25), or on an autoscaling cluster give it longer to grow "
        "(--wait-for-resources)"
    )
    return f"replicas of {', '.join(waiting)} wait to be scheduled; the cluster has {json.dumps(free)} free; {fix}"
