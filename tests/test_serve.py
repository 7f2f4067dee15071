"""The Serve application over real HTTP: search, embed, items, every client mistake, version pairing."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from tests.conftest import REPO_ROOT, free_port
from tests.test_index import TINY_MODEL, save_tiny_model, textured_jpeg
from visuray.catalog.schema import CatalogRecord, write_catalog
from visuray.checkpoint import load_embedding_model
from visuray.config import validate_config
from visuray.images import decode_image, encode_jpeg, to_model_input
from visuray.index.faiss_index import build_faiss_index, publish_index
from visuray.serving import IncompatibleIndexError, ServeAppArgs

pytestmark = pytest.mark.ray

CONFIG_FILE = REPO_ROOT / "serve" / "config.yaml"
MAX_IMAGE_BYTES = 64 * 1024  # small limits so that the tests can exceed them cheaply
MAX_IMAGE_PIXELS = 500_000
MAX_K = 20


@dataclass
class Served:
    url: str
    args: ServeAppArgs
    records: dict[str, CatalogRecord]
    model_version: str
    index_version: str
    tmp: Path


def config_app_args(**replace: Any) -> dict[str, Any]:
    """The ``args`` of serve/config.yaml with the given keys replaced (so the shipped file is exercised)."""
    config = yaml.safe_load(CONFIG_FILE.read_text())
    return {**config["applications"][0]["args"], **replace}


def build_served_artifacts(tmp: Path) -> tuple[dict[str, CatalogRecord], str, str]:
    """A tiny model, a 12-item catalog (one id with a slash, as folder ingest makes) and its Flat index."""
    records = [
        CatalogRecord(
            item_id=f"shirts/item-{i}" if i == 3 else f"item-{i}",
            image=textured_jpeg(100 + i),
            label=f"label{i % 3}",
            category="tops",
            title=f"Shirt number {i}",
            attributes={"size": "M"},
        )
        for i in range(12)
    ]
    write_catalog(records, str(tmp / "catalog"), shard_rows=5)
    model_version = save_tiny_model(str(tmp / "model"))
    model, _ = load_embedding_model(str(tmp / "model"))
    with torch.inference_mode():
        vectors = model(to_model_input([decode_image(r.image) for r in records], 32)).numpy()
    index = publish_index(
        str(tmp / "index"),
        build_faiss_index(vectors, "Flat", "ip"),
        [r.item_id for r in records],
        model_version=model_version,
        metric="ip",
        factory="Flat",
        extra_metadata={"catalog_uri": str(tmp / "catalog")},
    )
    return {r.item_id: r for r in records}, model_version, index.manifest.version


@pytest.fixture(scope="module")
def served(ray_cluster: object, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    from ray import serve

    from visuray.serving import start_serve_app

    tmp = tmp_path_factory.mktemp("serve")
    records, model_version, index_version = build_served_artifacts(tmp)
    small = {"num_cpus": 0.25, "num_replicas": 1}
    args = validate_config(
        ServeAppArgs,
        config_app_args(
            model=str(tmp / "model"),
            index=str(tmp / "index"),
            catalog=None,  # taken from the index manifest
            max_image_bytes=MAX_IMAGE_BYTES,
            max_image_pixels=MAX_IMAGE_PIXELS,
            max_k=MAX_K,
            default_k=5,
            embedder=small,
            search=small,
            router=small,
        ),
    )
    url = start_serve_app(args, port=free_port(), name="visuray-test")
    try:
        yield Served(url, args, records, model_version, index_version, tmp)
    finally:
        serve.shutdown()


def multipart(data: bytes, **fields: str) -> dict[str, Any]:
    return {"files": {"file": ("query.jpg", data, "image/jpeg")}, "data": fields}


def assert_client_error(response: httpx.Response, status: int) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert isinstance(response.json().get("error"), str) and response.json()["error"]


# -------------------------------------------------------------------------------------- answers
def test_search_with_a_catalog_image_returns_that_item_first(served: Served) -> None:
    for item_id in ["item-7", "shirts/item-3"]:
        record = served.records[item_id]
        response = httpx.post(f"{served.url}/v1/search", **multipart(record.image, k="4"), timeout=60)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["model_version"] == served.model_version and body["index_version"] == served.index_version
        assert body["k"] == 4 and len(body["results"]) == 4
        top = body["results"][0]
        assert top["item_id"] == item_id and top["score"] == pytest.approx(1.0, abs=1e-4)
        assert (top["label"], top["title"], top["category"]) == (record.label, record.title, "tops")
        scores = [hit["score"] for hit in body["results"]]
        assert scores == sorted(scores, reverse=True) and scores[1] < 0.9999


def test_json_raw_and_concurrent_queries_agree(served: Served) -> None:
    record = served.records["item-2"]
    as_json = httpx.post(
        f"{served.url}/v1/search",
        json={"image_b64": base64.b64encode(record.image).decode(), "k": 3},
        timeout=60,
    )
    raw = httpx.post(
        f"{served.url}/v1/search?k=3",
        content=record.image,
        headers={"content-type": "image/jpeg"},
        timeout=60,
    )
    assert as_json.status_code == raw.status_code == 200
    assert [h["item_id"] for h in as_json.json()["results"]] == [h["item_id"] for h in raw.json()["results"]]
    assert as_json.json()["results"][0]["item_id"] == "item-2"
    assert (
        len(httpx.post(f"{served.url}/v1/search", **multipart(record.image), timeout=60).json()["results"])
        == 5
    )

    # Concurrent queries are batched by the embedder and the search deployment; each gets its own answer.
    ids = [f"item-{i}" for i in (0, 1, 2, 4, 5, 6, 8, 9)]
    with ThreadPoolExecutor(len(ids)) as pool:
        answers = list(
            pool.map(
                lambda i: httpx.post(
                    f"{served.url}/v1/search", **multipart(served.records[i].image, k="1"), timeout=60
                ),
                ids,
            )
        )
    assert [a.json()["results"][0]["item_id"] for a in answers] == ids


def test_embed_returns_the_models_unit_vector(served: Served) -> None:
    record = served.records["item-5"]
    response = httpx.post(f"{served.url}/v1/embed", **multipart(record.image), timeout=60)
    assert response.status_code == 200, response.text
    body = response.json()
    vector = np.array(body["embedding"])
    assert (
        body["dim"] == TINY_MODEL.embedding_dim == len(vector)
        and body["model_version"] == served.model_version
    )
    assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)
    model, _ = load_embedding_model(str(served.tmp / "model"))
    with torch.inference_mode():
        expected = model(to_model_input([decode_image(record.image)], 32))[0].numpy()
    np.testing.assert_allclose(vector, expected, atol=1e-5)


def test_models_and_items(served: Served) -> None:
    models = httpx.get(f"{served.url}/v1/models", timeout=30).json()
    assert models["model"]["version"] == models["index"]["model_version"] == served.model_version
    assert models["index"]["version"] == served.index_version and models["index"]["count"] == 12
    assert models["catalog"]["count"] == 12

    item = httpx.get(f"{served.url}/v1/items/shirts/item-3", timeout=30).json()
    assert item["title"] == "Shirt number 3" and item["attributes"] == {"size": "M"}
    image = httpx.get(f"{served.url}{item['image_url']}", timeout=30)
    assert image.status_code == 200 and image.headers["content-type"] == "image/jpeg"
    assert image.content == served.records["shirts/item-3"].image
    # Items of another shard, twice (the second answer comes from the router's shard cache).
    for _ in range(2):
        assert (
            httpx.get(f"{served.url}/v1/items/item-11/image", timeout=30).content
            == served.records["item-11"].image
        )


# ------------------------------------------------------------------------------ client mistakes
def _png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (10, 20, 30)).save(buf, format="PNG")
    return buf.getvalue()


def test_every_client_mistake_is_a_4xx_json_error_and_the_service_survives(served: Served) -> None:
    url = served.url
    good = served.records["item-1"].image
    too_big = encode_jpeg(
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (400, 400, 3), dtype=np.uint8))
    )
    assert len(too_big) > MAX_IMAGE_BYTES
    cases = [
        ("not an image", "post", "/v1/search", multipart(b"hello, this is text"), 400),
        ("truncated JPEG", "post", "/v1/search", multipart(good[: len(good) // 2]), 400),
        ("too many pixels", "post", "/v1/embed", multipart(_png(1000, 600)), 400),
        ("payload too large", "post", "/v1/search", multipart(too_big), 413),
        (
            "raw payload too large",
            "post",
            "/v1/embed",
            {"content": too_big, "headers": {"content-type": "image/jpeg"}},
            413,
        ),
        (
            "base64 too large",
            "post",
            "/v1/search",
            {"json": {"image_b64": base64.b64encode(too_big).decode()}},
            413,
        ),
        ("k = 0", "post", "/v1/search", multipart(good, k="0"), 400),
        ("k > max_k", "post", "/v1/search", multipart(good, k=str(MAX_K + 1)), 400),
        (
            "k not a number",
            "post",
            "/v1/search",
            {"json": {"image_b64": base64.b64encode(good).decode(), "k": "ten"}},
            400,
        ),
        ("k fractional", "post", "/v1/search?k=2.5", multipart(good), 400),
        (
            "invalid JSON",
            "post",
            "/v1/search",
            {"content": b"{nope", "headers": {"content-type": "application/json"}},
            400,
        ),
        ("JSON without image", "post", "/v1/embed", {"json": {"k": 3}}, 400),
        ("JSON unknown field", "post", "/v1/embed", {"json": {"image": "abc"}}, 400),
        ("invalid base64", "post", "/v1/embed", {"json": {"image_b64": "***"}}, 400),
        (
            "multipart without a file",
            "post",
            "/v1/search",
            {"data": {"k": "3"}, "files": {"other": ("x", b"y")}},
            400,
        ),
        (
            "unsupported content type",
            "post",
            "/v1/search",
            {"content": b"abc", "headers": {"content-type": "text/plain"}},
            415,
        ),
        ("unknown item", "get", "/v1/items/no-such-item", {}, 404),
        ("unknown item image", "get", "/v1/items/no-such-item/image", {}, 404),
        ("unknown route", "get", "/v2/nothing", {}, 404),
        ("wrong method", "get", "/v1/search", {}, 405),
    ]
    for name, method, path, kwargs, status in cases:
        response = httpx.request(method, f"{url}{path}", timeout=60, **kwargs)
        try:
            assert_client_error(response, status)
        except AssertionError as exc:
            raise AssertionError(f"{name}: {exc}") from None

    assert httpx.get(f"{url}/healthz", timeout=30).json() == {"status": "ok"}
    after = httpx.post(f"{url}/v1/search", **multipart(good, k="1"), timeout=60)
    assert after.status_code == 200 and after.json()["results"][0]["item_id"] == "item-1"


# ---------------------------------------------------------------------------- version pairing
def test_an_index_of_another_model_is_refused(served: Served) -> None:
    from visuray.serving import BatchSettings
    from visuray.serving_app import Search, build_app

    other_version = save_tiny_model(str(served.tmp / "other-model"), seed=1)
    args = served.args.model_copy(update={"model": str(served.tmp / "other-model")})
    with pytest.raises(IncompatibleIndexError, match=f"built with model version '{served.model_version}'"):
        build_app(args)
    # The Search replica makes the same check against the index it actually loaded.
    with pytest.raises(IncompatibleIndexError, match=other_version):
        Search.func_or_class(
            str(served.tmp / "index"), served.args.storage, other_version, 16, BatchSettings(), 1
        )
    # The running application is untouched.
    assert httpx.get(f"{served.url}/healthz", timeout=30).status_code == 200


def test_serve_config_file_deploys_through_rays_own_builder_path(served: Served) -> None:
    """serve/config.yaml is a valid Serve config whose import path and args build this application."""
    from ray._common.utils import import_attr
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load(CONFIG_FILE.read_text())
    schema = ServeDeploySchema.model_validate(config)
    app = schema.applications[0]
    assert app.import_path == "serve.app:build_app" and app.route_prefix == "/"
    assert {d.name for d in app.deployments} == {"Embedder", "Search", "Router"}
    for deployment in app.deployments:
        assert (
            deployment.autoscaling_config
            and deployment.max_ongoing_requests
            and deployment.max_queued_requests
        )

    builder = import_attr(app.import_path)
    args = config_app_args(model=str(served.tmp / "model"), index=str(served.tmp / "index"))
    application = call_user_app_builder_with_args_if_necessary(builder, args)
    assert type(application).__name__ == "Application"
    with pytest.raises(Exception, match="unknown_knob"):
        call_user_app_builder_with_args_if_necessary(builder, {**args, "unknown_knob": 1})
