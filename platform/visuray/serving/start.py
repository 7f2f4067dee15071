"""Starting the Serve application on a running cluster: deploy it, wait until it answers, and find the
router replicas' own addresses (Ray Serve's direct ingress)."""

from __future__ import annotations

import logging
import time

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


def start_serve_app(
    args: ServeAppArgs,
    host: str = "127.0.0.1",
    port: int = 8000,
    name: str = APP_NAME,
    timeout_s: float = 180.0,
    access_log: bool = True,
) -> str:
    """Deploy the application on the connected Ray cluster and return its base URL once /healthz answers.

    ``access_log=False`` keeps Serve's per-request log lines out of the console (the demo prints its own).

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
    serve.run(build_app(args), name=name, route_prefix="/", blocking=False, logging_config=logging_config)
    host, port = _serve_http_address(host, port)
    base_url = f"http://{host}:{port}"
    deadline = time.monotonic() + timeout_s
    last_error = ""
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base_url}/healthz", timeout=5).status_code == 200:
                log.info("Serve application %r answers at %s", name, base_url)
                return base_url
            last_error = "healthz did not answer 200"
        except httpx.HTTPError as exc:
            last_error = str(exc)
        time.sleep(0.25)
    raise TimeoutError(
        f"Serve application {name!r} did not answer {base_url}/healthz in {timeout_s}s: {last_error}"
    )
