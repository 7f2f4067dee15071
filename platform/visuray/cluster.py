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
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

# Train V2 is the API Visuray is written against (ray.train.report / get_checkpoint semantics).
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
# Ray Train V2 moves every training worker into a directory of its own run by default, so a job spec's
# relative paths (``catalog: ./runs/catalogs/x``, what `visuray run` from a project folder passes) would
# name nothing there. Read where the trainer is built (the driver), so it is set on import.
os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")

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


@dataclass
class _ConsoleSettings:
    """Whether Ray's own output reaches this process's console, set by :func:`quiet_ray_console`."""

    worker_logs: bool = True  # every worker's and actor's stdout/stderr, prefixed "(RayTrainWorker pid=..)"
    log_dir: str | None = None  # where they go instead: the cluster's session logs


_CONSOLE = _ConsoleSettings()


def quiet_ray_console() -> None:
    """Keep Ray's internals off this process's console: the workers' output (Ray Train's per-report
    lines, DeepSpeed's start-up chatter) stays in the cluster's log files, and Ray's own driver-side
    logger says only errors. What a person needs comes from Visuray instead (progress displays, errors).
    Call before :func:`ensure_ray`; ``visuray --verbose`` does not call it."""
    _CONSOLE.worker_logs = False


def ray_log_dir() -> str | None:
    """The connected cluster's log folder on this machine (for messages that point at it)."""
    return _CONSOLE.log_dir


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
    kwargs.setdefault("log_to_driver", _CONSOLE.worker_logs)
    if not _CONSOLE.worker_logs:  # Ray's driver-side logger: errors only
        kwargs.setdefault("logging_level", logging.ERROR)
    if address:
        log.info("connecting to the Ray cluster at %s", address)
        # Inside a submitted job the job's runtime env (which sets RAY_TRAIN_V2_ENABLED) already applies;
        # Ray refuses a driver runtime env that repeats its keys.
        context = ray.init(address=address, **kwargs)
    else:
        log.info("starting an embedded local Ray cluster")
        context = ray.init(**embedded_cluster_options(num_cpus, env_vars, **kwargs))
    session_dir = context.address_info.get("session_dir")
    _CONSOLE.log_dir = os.path.join(session_dir, "logs") if session_dir else None
    if not _CONSOLE.worker_logs:
        log.info("Ray's own logs (workers, DeepSpeed): %s; --verbose shows them here", _CONSOLE.log_dir)


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


class StopRequested(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived while :func:`stop_on_signals` was in force. A KeyboardInterrupt, so that
    what Ray does on Ctrl-C inside a blocking call (leave it, keep the cluster usable) happens here too and
    no ``except Exception`` on the way swallows it."""

    def __init__(self, received: signal.Signals) -> None:
        super().__init__(received.name)
        self.signal = received


def _handle_stop_signals(on_first: Callable[[signal.Signals], None]) -> None:
    """Handle SIGINT and SIGTERM here (Ray's own SIGTERM handling ends a driver with a native stack dump):
    the first one calls ``on_first``; once one has arrived, a second one ends the process at once
    (exit 128 + its number), the way out if stopping hangs."""
    received: list[signal.Signals] = []

    def handle(signum: int, _frame: Any) -> None:
        if received:
            os._exit(128 + signum)
        received.append(signal.Signals(signum))
        on_first(received[0])

    for stop_signal in STOP_SIGNALS:
        signal.signal(stop_signal, handle)


def wait_for_stop_signal(poll_s: float = 0.5) -> signal.Signals:
    """Block until SIGINT or SIGTERM arrives (main thread only); return which. Neither interrupts the stop
    that follows halfway; a second one ends the process at once."""
    received: list[signal.Signals] = []
    _handle_stop_signals(received.append)
    while not received:
        time.sleep(poll_s)  # handlers run between these sleeps
    return received[0]


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within the block (main thread only), SIGINT or SIGTERM raises :class:`StopRequested` where the main
    thread is, e.g. in a training run's ``fit()``; a second signal ends the process at once. The caller
    catches it, stops what it started and says so. Python's handlers are back after the block."""
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}

    def raise_stop(received: signal.Signals) -> None:
        raise StopRequested(received)

    _handle_stop_signals(raise_stop)
    _STOPPABLE.set()
    try:
        yield
    finally:
        _STOPPABLE.clear()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


_STOPPABLE = threading.Event()  # set while stop_on_signals is in force


def run_stoppable(call: Callable[[], T]) -> T:
    """``call()``; while :func:`stop_on_signals` is in force, in a helper thread, the main thread waiting.

    Two reasons: a signal then reaches the main thread within a fraction of a second, and a library that
    installs its own SIGINT handler in the main thread cannot take the signal over (Ray Train's ``fit()``
    does: it aborts the run, then exits the process without a word). Elsewhere (a library caller, a
    test) ``call`` runs here, with the caller's own signal handling.
    """
    if not _STOPPABLE.is_set() or threading.current_thread() is not threading.main_thread():
        return call()
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = call()
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread as it is
            outcome["error"] = exc

    helper = threading.Thread(target=run, name="visuray-stoppable", daemon=True)
    helper.start()
    while helper.is_alive():
        helper.join(0.2)  # signal handlers run between these waits
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


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
