"""API keys on the router (unit: key loading and constant-time checks; live: 401s and the open /healthz)
and the refusal of URL inputs: the service never fetches what a client points at.

The live tests use the "operations" application of :func:`ops_app` (API keys from a file, as a mounted
Kubernetes secret gives them, and 2 embedder replicas), shared with tests/test_fault_tolerance.py and
tests/test_observability.py.
"""

from __future__ import annotations

import base64
import hmac
import inspect
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.test_serve import Served, build_served_artifacts, multipart, served_app_args, wait_until_healthy
from visuray.serving import ServeAppArgs
from visuray.serving.security import ApiKeyGuard, load_api_keys, parse_api_keys, presented_key

OPS_APP = "visuray-ops"
OPS_PREFIX = "/ops"
API_KEY = "ops-key-0123456789abcdef"
ROTATED_KEY = "ops-key-rotated-fedcba"


# -------------------------------------------------------------------------------------- the app
@dataclass
class OpsApp:
    url: str  # the app's base URL (proxy + route prefix)
    served: Served
    headers: dict[str, str]  # a valid key


_OPS: OpsApp | None = None


def _proxy_port() -> int:
    from ray.serve.context import _get_global_client

    return int(_get_global_client().get_serve_details()["http_options"]["port"])


def ops_app(tmp_path_factory: pytest.TempPathFactory) -> OpsApp:
    """A second application on the session's Serve: API keys from a file, 2 EmbeddingEnsemble replicas,
    no fusion or attributes (started on first use; deployed next to whatever Serve already runs)."""
    global _OPS
    if _OPS is None:
        from ray import serve

        from tests.conftest import free_port
        from visuray.serving.deployments import build_app

        tmp = tmp_path_factory.mktemp("ops")
        built = build_served_artifacts(tmp)
        keys = tmp / "api-keys"
        keys.write_text(f"# mounted secret\n{API_KEY}\n{ROTATED_KEY}\n")
        base = served_app_args(tmp, api_keys_file=str(keys)).model_dump()
        args = ServeAppArgs.model_validate(
            {
                **base,
                "fusion": None,
                "attributes": None,
                "embedder": {**base["embedder"], "num_replicas": 2, "max_ongoing_requests": 8},
                # Uncached: each /v1/models asks the replicas, so the replica-kill test exercises it.
                "models_cache_ttl_s": 0,
            }
        )
        # Serve's HTTP options are cluster-wide: start it on a free port unless it already runs.
        serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
        serve.run(build_app(args), name=OPS_APP, route_prefix=OPS_PREFIX, blocking=False)
        url = f"http://127.0.0.1:{_proxy_port()}{OPS_PREFIX}"
        wait_until_healthy(f"{url}/healthz")
        _OPS = OpsApp(
            url=url, served=Served(url=url, args=args, tmp=tmp, **built), headers={"X-API-Key": API_KEY}
        )
    return _OPS


@pytest.fixture(scope="module")
def ops(ray_cluster: object, tmp_path_factory: pytest.TempPathFactory) -> OpsApp:
    return ops_app(tmp_path_factory)


# -------------------------------------------------------------------------------------- unit
@pytest.mark.unit
def test_keys_come_from_the_environment_and_a_mounted_file(tmp_path: Path) -> None:
    assert parse_api_keys(" a, b\n# comment\n\nc,a ") == ("a", "b", "c")
    secret = tmp_path / "keys"
    secret.write_text("k1\nk2\n")
    assert load_api_keys(secret, environ={"VISURAY_API_KEYS": "e1,k1"}) == ("e1", "k1", "k2")
    assert load_api_keys(None, environ={}) == ()
    assert load_api_keys(None, "OTHER", environ={"OTHER": "x"}) == ("x",)
    with pytest.raises(FileNotFoundError, match="mounted"):  # a secret that failed to mount: no open door
        load_api_keys(tmp_path / "missing", environ={})


@pytest.mark.unit
def test_guard_compares_every_key_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr("visuray.serving.security.hmac.compare_digest", spy)
    guard = ApiKeyGuard(("first", "second", "third"))
    assert guard.accepts("first") and guard.accepts("third")
    calls.clear()
    assert guard.accepts("first")
    assert len(calls) == 3, "a match must not end the comparison early"
    assert not guard.accepts("firs") and not guard.accepts("") and not guard.accepts(None)

    assert guard.denial("/healthz", {}) is None
    assert "required" in guard.denial("/v1/search", {})
    assert "not valid" in guard.denial("/v1/search", {"x-api-key": "nope"})
    assert guard.denial("/v1/search", {"authorization": "Bearer second"}) is None
    assert guard.denial("/v1/search", {"authorization": "Basic second"}) is not None
    assert ApiKeyGuard(()).denial("/v1/search", {}) is None  # no keys configured: open
    assert presented_key({"x-api-key": " k "}) == "k"


@pytest.mark.unit
def test_configs_written_beside_artifacts_carry_no_storage_credentials() -> None:
    import yaml

    from visuray.config import config_to_yaml, validate_config
    from visuray.metric_learning.config import FinetuneConfig

    spec = {
        "job": "finetune",
        "catalog": "s3://b/c",
        "output": "s3://b/models/m",
        "storage": {"key": "AKIA-TEST", "secret": "s3cr3t-value"},
    }
    cfg = validate_config(FinetuneConfig, spec, "spec.yaml")
    written = config_to_yaml(cfg)
    assert "s3cr3t-value" not in written and "AKIA-TEST" not in written
    assert yaml.safe_load(written)["storage"] == {
        **yaml.safe_load(written)["storage"],
        "key": None,
        "secret": None,
    }
    # reloading the written config works: the credentials then come from the environment
    assert validate_config(FinetuneConfig, yaml.safe_load(written), "written.yaml").catalog == "s3://b/c"
    # a job submission passes them on to the cluster's driver as given
    assert "s3cr3t-value" in config_to_yaml(cfg, keep_credentials=True)


@pytest.mark.unit
def test_serving_code_has_no_way_to_fetch_a_url() -> None:
    """The request path never opens a client connection: no HTTP client or URL opener is used by the
    router, the input parsing or the deployments (catalog images come from storage, by item id)."""
    import visuray.serving.catalog_items
    import visuray.serving.deployments
    import visuray.serving.router
    import visuray.serving.schemas

    for module in (
        visuray.serving.router,
        visuray.serving.schemas,
        visuray.serving.deployments,
        visuray.serving.catalog_items,
    ):
        source = inspect.getsource(module)
        for opener in ("urlopen", "httpx", "requests.", "aiohttp", "urllib.request", "fsspec.open("):
            assert opener not in source, f"{module.__name__} uses {opener}"


# -------------------------------------------------------------------------------------- live
@pytest.mark.ray
def test_api_key_is_required_except_for_healthz(ops: OpsApp) -> None:
    image = ops.served.records["item-1"].image
    with httpx.Client(timeout=60) as http:
        assert http.get(f"{ops.url}/healthz").status_code == 200  # probes carry no secret
        for headers in ({}, {"X-API-Key": "wrong"}, {"Authorization": f"Bearer {API_KEY}x"}):
            response = http.post(f"{ops.url}/v1/search", headers=headers, **multipart(image, k="2"))
            assert response.status_code == 401, response.text
            assert response.headers["content-type"].startswith("application/json")
            assert response.json()["error"] and response.headers["www-authenticate"] == "Bearer"
        assert http.get(f"{ops.url}/v1/models").status_code == 401
        assert http.get(f"{ops.url}/v1/items/item-1").status_code == 401
        for headers in (ops.headers, {"Authorization": f"Bearer {ROTATED_KEY}"}):
            response = http.post(f"{ops.url}/v1/search", headers=headers, **multipart(image, k="2"))
            assert response.status_code == 200, response.text
            assert response.json()["results"][0]["item_id"] == "item-1"


@pytest.mark.ray
def test_image_urls_are_refused_not_fetched(ops: OpsApp) -> None:
    """A URL where an image belongs is a 4xx: the service fetches nothing a client points at (no SSRF)."""
    url = "http://169.254.169.254/latest/meta-data/"
    bodies = [
        {"image_url": url},
        {"image_b64": url},
        {"image_b64": base64.b64encode(b"x").decode(), "image_url": url},
        {"url": url, "k": 3},
    ]
    with httpx.Client(timeout=60, headers=ops.headers) as http:
        for body in bodies:
            response = http.post(f"{ops.url}/v1/search", json=body)
            assert 400 <= response.status_code < 500, (body, response.text)
            assert response.json()["error"]
        # a URL as form field or raw body is no image either
        response = http.post(f"{ops.url}/v1/search", data={"image": url})
        assert 400 <= response.status_code < 500, response.text
        response = http.post(
            f"{ops.url}/v1/search", content=url.encode(), headers={"content-type": "text/plain"}
        )
        assert 400 <= response.status_code < 500, response.text
        assert http.get(f"{ops.url}/healthz").status_code == 200
