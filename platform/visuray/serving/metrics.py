"""Metrics of the Serve application.

The router records, per request, a counter by route and status, a latency histogram by route, an
error counter by status, and a gauge ``visuray_served_version`` (value 1) whose tags name the model,
index and catalog versions being served. They are ``ray.serve.metrics`` objects, so Serve adds the
deployment, replica and application tags, and Ray exports them with its own metrics on every node's
metrics-export port (Prometheus format; ``ray_`` prefixed) -- scraped like Ray's built-in Serve metrics.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Mapping

log = logging.getLogger(__name__)

# Ray drops a gauge sample that has not been set again within two export intervals (20 s by default), so
# the served versions are set again on this period for as long as the replica lives.
VERSION_REFRESH_S = 5.0
# Seconds; from a cached search (a few ms) to a cold CPU replica (seconds).
LATENCY_BOUNDARIES_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]
_ID_SEGMENT = re.compile(r"^(/v1/items)/.+?(/image)?$")


_SAFE_ROUTE = re.compile(r"[/A-Za-z0-9_.{}-]{1,64}")


def route_label(path: str) -> str:
    """A bounded set of route names for tags: item ids are folded into ``{id}`` (unbounded tag values
    would make one time series per item)."""
    match = _ID_SEGMENT.match(path)
    if match:
        return f"{match.group(1)}/{{id}}{match.group(2) or ''}"
    known = path.startswith("/v1/") or path in ("/", "/healthz", "/openapi.json", "/docs")
    # Arbitrary client paths (a fuzzer sends control characters) must not become tag values.
    return path if known and _SAFE_ROUTE.fullmatch(path) else "other"


class ServeMetrics:
    """The router's metrics; create one per replica (in its constructor: Ray must be initialised)."""

    def __init__(self, version_refresh_s: float = VERSION_REFRESH_S) -> None:
        from ray.serve.metrics import Counter, Gauge, Histogram

        self.requests = Counter(
            "visuray_requests_total",
            "HTTP requests answered, by route and status",
            tag_keys=("route", "status"),
        )
        self.errors = Counter(
            "visuray_request_errors_total",
            "requests answered with a 4xx or 5xx, by route and status",
            tag_keys=("route", "status"),
        )
        self.latency = Histogram(
            "visuray_request_latency_s",
            "time from request to answer in the router, seconds",
            boundaries=LATENCY_BOUNDARIES_S,
            tag_keys=("route",),
        )
        self.versions = Gauge(
            "visuray_served_version",
            "1 for each (component, version) pair being served: model ensemble, index, catalog",
            tag_keys=("component", "version"),
        )
        self._served: dict[str, str] = {}  # component -> version now set to 1
        self._lock = threading.Lock()
        self._refresher = threading.Thread(
            target=self._refresh_versions,
            args=(version_refresh_s,),
            name="visuray-version-gauge",
            daemon=True,
        )
        self._refresher.start()

    def record(self, path: str, status: int, seconds: float) -> None:
        """Count one answered request. Metrics never fail a request: a recording error is logged only."""
        route = route_label(path)
        tags = {"route": route, "status": str(status)}
        try:
            self.requests.inc(1, tags=tags)
            if status >= 400:
                self.errors.inc(1, tags=tags)
            self.latency.observe(seconds, tags={"route": route})
        except Exception:  # noqa: BLE001 - observability must not turn an answer into a 500
            log.warning("could not record metrics for %r", route, exc_info=True)

    def set_versions(self, versions: Mapping[str, str | None]) -> None:
        """Mark what is served now; a replaced version (an index hot swap) drops to 0."""
        with self._lock:
            for component, version in versions.items():
                previous = self._served.get(component)
                if not version or version == previous:
                    continue
                if previous is not None:
                    self.versions.set(0, tags={"component": component, "version": previous})
                self.versions.set(1, tags={"component": component, "version": str(version)})
                self._served[component] = str(version)

    def _refresh_versions(self, period_s: float) -> None:
        """Set the served versions again and again: a gauge set once would vanish from the export."""
        while True:
            time.sleep(period_s)
            try:
                with self._lock:
                    for component, version in self._served.items():
                        self.versions.set(1, tags={"component": component, "version": version})
            except Exception:  # noqa: BLE001 - a metrics hiccup must not end the refresher
                log.warning("could not refresh the served-version gauge", exc_info=True)


def parse_prometheus(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """Samples of one metric from Prometheus text: ``[(labels, value)]`` (for checks and the benchmark)."""
    samples = []
    pattern = re.compile(r"^" + re.escape(name) + r"\{(.*)\}\s+(\S+)$")
    for line in text.splitlines():
        match = pattern.match(line)
        if match:
            labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(1)))
            samples.append((labels, float(match.group(2))))
    return samples
