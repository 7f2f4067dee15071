"""The Serve application over real HTTP: search, embed, composed search, attributes, items, every client
mistake, version pairing, and an index hot-swap under a stream of requests.

One application (an ensemble of two tiny ViTs, a tiny fusion model, a tiny attribute model, their indexes)
is started once per test session by :func:`shared_app` and reused by tests/test_serve_fuzz.py and
tests/test_web.py: starting Serve is the slow part on 2 cores.
"""

from __future__ import annotations

import base64
import io
import statistics
import threading
import time
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
from tests.test_index import TINY_INPUT, TINY_MODEL, save_tiny_model, textured_jpeg
from visuray.catalog.schema import CatalogRecord, write_catalog
from visuray.config import validate_config
from visuray.images import decode_image, encode_jpeg, to_model_input
from visuray.index.ensemble import EmbeddingEnsemble, EnsembleMember, EnsembleSpec
from visuray.index.faiss_index import build_faiss_index, publish_index
from visuray.models.embedding import load_embedding_model
from visuray.serving import IncompatibleIndexError, ServeAppArgs

pytestmark = pytest.mark.ray

CONFIG_FILE = REPO_ROOT / "serve" / "config.yaml"
MAX_IMAGE_BYTES = 64 * 1024  # small limits so that the tests can exceed them cheaply
MAX_IMAGE_PIXELS = 500_000
MAX_K = 20
MAX_TEXT = 200
MODELS_CACHE_TTL_S = 600
ATTRIBUTE_LABELS = ["red", "blue", "green"]
ATTRIBUTE_THRESHOLDS = [0.0, 0.5, 1.01]  # always, decided by the score, never
TEXTS = ["in red", "in blue", "with short sleeves", "same but darker", "longer and red"]


@dataclass
class Served:
    url: str
    args: ServeAppArgs
    records: dict[str, CatalogRecord]
    ensemble: EnsembleSpec
    model_version: str  # the ensemble's
    index_version: str
    fusion_version: str
    tmp: Path


def config_app_args(**replace: Any) -> dict[str, Any]:
    """The ``args`` of serve/config.yaml with the given keys replaced (so the shipped file is exercised)."""
    config = yaml.safe_load(CONFIG_FILE.read_text())
    return {**config["applications"][0]["args"], **replace}


def catalog_records() -> list[CatalogRecord]:
    """12 items, one id with a slash (as folder ingest makes), over 3 shards."""
    return [
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


def save_tiny_fusion_model(uri: str) -> str:
    """A randomly initialised tiny fusion model with a tokenizer trained on a few phrases; its version."""
    from visuray.fusion.config import FusionModelConfig, TextEncoderConfig
    from visuray.fusion.model import build_fusion_model, save_fusion_model
    from visuray.fusion.tokenizer import TextTokenizer, train_tokenizer

    tokenizer = TextTokenizer(train_tokenizer(TEXTS * 3, vocab_size=60, min_frequency=1), max_length=16)
    cfg = FusionModelConfig(
        backbone=TINY_MODEL.backbone,
        text=TextEncoderConfig(
            width=32, depth=1, heads=2, max_length=16, dropout=0, vocab_size=tokenizer.vocab_size
        ),
        fusion="residual",
        fusion_depth=1,
        fusion_width=32,
        fusion_heads=2,
        fusion_dropout=0,
        embed_dim=16,
    )
    torch.manual_seed(3)
    artifact = save_fusion_model(uri, build_fusion_model(cfg).eval(), cfg, tokenizer)
    return artifact.manifest.metadata["model_version"]


def save_tiny_attribute_model(uri: str) -> None:
    from visuray.attributes.config import AttributeModelConfig, GroupHead
    from visuray.attributes.export import save_attribute_model
    from visuray.attributes.model import build_attribute_model

    cfg = AttributeModelConfig(
        backbone=TINY_MODEL.backbone, embed_dim=16, groups=[GroupHead(name="colour", labels=ATTRIBUTE_LABELS)]
    )
    torch.manual_seed(4)
    save_attribute_model(uri, build_attribute_model(cfg).eval(), cfg, ATTRIBUTE_THRESHOLDS)


def publish_test_index(
    uri: str, vectors: np.ndarray, ids: list[str], version: str, catalog: str, factory: str = "Flat"
):
    return publish_index(
        uri,
        build_faiss_index(vectors, factory, "ip"),
        ids,
        model_version=version,
        metric="ip",
        factory=factory,
        extra_metadata={"catalog_uri": catalog},
    )


def build_served_artifacts(tmp: Path) -> dict[str, Any]:
    """Catalog, a 2-model ensemble and its index, a fusion model and its target index, an attribute model."""
    from visuray.predictors import load_fusion_model

    records = catalog_records()
    write_catalog(records, str(tmp / "catalog"), shard_rows=5)
    for i in range(2):
        save_tiny_model(str(tmp / f"model{i}"), seed=i)
    ensemble = EnsembleSpec(
        members=[
            EnsembleMember(uri=str(tmp / "model0"), weight=1),
            EnsembleMember(uri=str(tmp / "model1"), weight=2),
        ]
    )
    embedder = EmbeddingEnsemble.load(ensemble)
    images = [decode_image(r.image) for r in records]
    ids = [r.item_id for r in records]
    index = publish_test_index(
        str(tmp / "index"), embedder.embed(images), ids, embedder.version, str(tmp / "catalog")
    )

    fusion_version = save_tiny_fusion_model(str(tmp / "fusion"))
    targets = load_fusion_model(str(tmp / "fusion")).encode_images(images)
    publish_test_index(str(tmp / "fusion-index"), targets, ids, fusion_version, str(tmp / "catalog"))
    save_tiny_attribute_model(str(tmp / "attributes"))
    return {
        "records": {r.item_id: r for r in records},
        "ensemble": ensemble,
        "model_version": embedder.version,
        "index_version": index.manifest.version,
        "fusion_version": fusion_version,
    }


def served_app_args(tmp: Path, **replace: Any) -> ServeAppArgs:
    small = {"num_cpus": 0.25, "num_replicas": 1}
    return validate_config(
        ServeAppArgs,
        config_app_args(
            model=None,
            ensemble={
                "members": [
                    {"uri": str(tmp / "model0"), "weight": 1},
                    {"uri": str(tmp / "model1"), "weight": 2},
                ]
            },
            index=str(tmp / "index"),
            catalog=None,  # taken from the index manifest
            fusion={"model": str(tmp / "fusion"), "index": str(tmp / "fusion-index"), "deployment": small},
            attributes={"model": str(tmp / "attributes"), "deployment": small},
            index_reload_interval_s=0.5,
            # Longer than any test takes: an index swap must show in /v1/models by invalidation, not expiry.
            models_cache_ttl_s=MODELS_CACHE_TTL_S,
            max_image_bytes=MAX_IMAGE_BYTES,
            max_image_pixels=MAX_IMAGE_PIXELS,
            max_k=MAX_K,
            max_text_chars=MAX_TEXT,
            default_k=5,
            embedder=small,
            search=small,
            router=small,
            **replace,
        ),
    )


_SHARED: Served | None = None


def shared_app(tmp_path_factory: pytest.TempPathFactory) -> Served:
    """The session's Serve application (started on first use; Serve is shut down with the Ray fixture)."""
    global _SHARED
    if _SHARED is None:
        from visuray.serving import start_serve_app

        tmp = tmp_path_factory.mktemp("serve")
        built = build_served_artifacts(tmp)
        args = served_app_args(tmp)
        url = start_serve_app(args, port=free_port(), name="visuray-test", access_log=False)
        _SHARED = Served(url=url, args=args, tmp=tmp, **built)
    return _SHARED


@pytest.fixture(scope="module")
def served(ray_cluster: object, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    yield shared_app(tmp_path_factory)


def multipart(data: bytes, **fields: str) -> dict[str, Any]:
    return {"files": {"image": ("query.jpg", data, "image/jpeg")}, "data": fields}


def assert_client_error(response: httpx.Response, status: int) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert isinstance(response.json().get("error"), str) and response.json()["error"]


def reference_ensemble_vector(served: Served, image: bytes) -> np.ndarray:
    """Slow reference: each tiny model in process, then the concat formula written out."""
    outputs = []
    for member in served.ensemble.members:
        model, _ = load_embedding_model(member.uri)
        with torch.inference_mode():
            out = model(to_model_input([decode_image(image)], TINY_INPUT))[0].numpy()
        outputs.append(out / np.linalg.norm(out) * np.sqrt(member.weight / 3))
    return np.concatenate(outputs)


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
        assert top["image_url"] == f"/v1/items/{item_id}/image"
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

    # Concurrent queries are batched by the ensemble and the search deployment; each gets its own answer.
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


def test_concurrent_requests_share_batches(served: Served) -> None:
    """Requests arriving together are embedded (and searched) in batches larger than one, up to the
    configured size: with max_batch_size 1, or a deployment that does not batch, this fails. Each batched
    deployment's ``batching()`` counts its batches by size (the session app has one replica of each)."""
    import asyncio

    from ray import serve

    names = ("EmbeddingEnsemble", "Search")
    ids = [f"item-{i}" for i in (0, 1, 2, 4, 5, 6, 8, 9)] * 2  # as above: items whose top-1 is themselves

    async def run() -> tuple[list[httpx.Response], list[dict[str, Any]], list[dict[str, Any]]]:
        # One event loop for every handle call: in the throughput-optimised mode a handle routes on the
        # loop it was first used from.
        handles = [serve.get_deployment_handle(name, app_name="visuray-test") for name in names]
        before = [await handle.batching.remote() for handle in handles]
        async with httpx.AsyncClient(timeout=60) as client:
            answers = await asyncio.gather(
                *(
                    client.post(f"{served.url}/v1/search", **multipart(served.records[i].image, k="1"))
                    for i in ids
                )
            )
        after = [await handle.batching.remote() for handle in handles]
        return answers, before, after

    answers, before, after = asyncio.run(run())
    assert [a.json()["results"][0]["item_id"] for a in answers] == ids
    settings = (served.args.embed_batch, served.args.search_batch)
    for name, setting, old, new in zip(names, settings, before, after, strict=True):
        assert new["max_batch_size"] == setting.max_batch_size
        assert new["requests"] - old["requests"] == len(ids), (name, old, new)
        ran = {int(size): n - old["sizes"].get(size, 0) for size, n in new["sizes"].items()}
        sizes = [size for size, n in ran.items() if n > 0]
        assert 1 < max(sizes) <= setting.max_batch_size, (name, ran)


def test_embed_returns_the_ensembles_unit_vector(served: Served) -> None:
    record = served.records["item-5"]
    response = httpx.post(f"{served.url}/v1/embed", **multipart(record.image), timeout=60)
    assert response.status_code == 200, response.text
    body = response.json()
    vector = np.array(body["embedding"])
    assert body["dim"] == 2 * TINY_MODEL.embedding_dim == len(vector)
    assert body["model_version"] == served.model_version and served.model_version.startswith("ensemble-")
    assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(vector, reference_ensemble_vector(served, record.image), atol=1e-5)


def test_composed_search_uses_the_fusion_model_and_its_index(served: Served) -> None:
    from visuray.fusion.predict import FusionPredictor

    record = served.records["item-4"]
    response = httpx.post(
        f"{served.url}/v1/search/composed", **multipart(record.image, text="in red", k="12"), timeout=60
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert (
        body["model_version"] == served.fusion_version
        and body["text"] == "in red"
        and len(body["results"]) == 12
    )
    # The same ranking as the fusion model and a brute-force search in process.
    predictor = FusionPredictor.load(str(served.tmp / "fusion"))
    query = predictor.encode_query(decode_image(record.image), "in red").vector
    targets = predictor.encode_images([decode_image(r.image) for r in served.records.values()])
    scores = targets @ query
    expected = [list(served.records)[i] for i in np.argsort(-scores, kind="stable")]
    assert [h["item_id"] for h in body["results"]] == expected
    np.testing.assert_allclose([h["score"] for h in body["results"]], np.sort(scores)[::-1], atol=1e-4)
    # JSON works too, and another text changes the query.
    other = httpx.post(
        f"{served.url}/v1/search/composed",
        json={"image_b64": base64.b64encode(record.image).decode(), "text": "with short sleeves", "k": 12},
        timeout=60,
    ).json()
    assert [h["score"] for h in other["results"]] != [h["score"] for h in body["results"]]


def test_attributes_apply_each_labels_threshold(served: Served) -> None:
    from visuray.attributes.predict import AttributePredictor

    record = served.records["item-6"]
    response = httpx.post(f"{served.url}/v1/attributes", **multipart(record.image), timeout=60)
    assert response.status_code == 200, response.text
    body = response.json()
    expected = AttributePredictor.load(str(served.tmp / "attributes")).predict([decode_image(record.image)])[
        0
    ]
    assert set(body["scores"]) == set(ATTRIBUTE_LABELS)
    for label, score in expected.items():
        assert body["scores"][label] == pytest.approx(score, abs=1e-5)
    thresholds = dict(zip(ATTRIBUTE_LABELS, ATTRIBUTE_THRESHOLDS, strict=True))
    present = {a["label"] for a in body["labels"]}
    assert present == {label for label, s in expected.items() if s >= thresholds[label]}
    assert "red" in present and "green" not in present
    assert all(a["threshold"] == thresholds[a["label"]] for a in body["labels"])


def test_models_and_items(served: Served) -> None:
    models = httpx.get(f"{served.url}/v1/models", timeout=30).json()
    assert models["model"]["version"] == models["index"]["model_version"] == served.model_version
    assert [m["weight"] for m in models["model"]["members"]] == [1, 2] and models["model"][
        "combine"
    ] == "concat"
    assert models["index"]["count"] == 12 and models["catalog"]["count"] == 12
    assert models["fusion"]["version"] == models["fusion"]["index"]["model_version"] == served.fusion_version
    assert models["attributes"]["labels"] == sorted(ATTRIBUTE_LABELS)

    item = httpx.get(f"{served.url}/v1/items/shirts/item-3", timeout=30).json()
    assert item["title"] == "Shirt number 3" and item["attributes"] == {"size": "M"}
    image = httpx.get(f"{served.url}{item['image_url']}", timeout=30)
    assert image.status_code == 200 and image.headers["content-type"] == "image/jpeg"
    assert image.content == served.records["shirts/item-3"].image
    for _ in range(2):  # another shard, twice (the second answer comes from the router's shard cache)
        assert (
            httpx.get(f"{served.url}/v1/items/item-11/image", timeout=30).content
            == served.records["item-11"].image
        )
    page = httpx.get(f"{served.url}/v1/items?limit=5&offset=2", timeout=30).json()
    assert page["count"] == 12 and [i["item_id"] for i in page["items"]] == sorted(served.records)[2:7]


def test_openapi_schema_documents_the_routes(served: Served) -> None:
    schema = httpx.get(f"{served.url}/openapi.json", timeout=30).json()
    paths = schema["paths"]
    for path in ("/v1/embed", "/v1/search", "/v1/search/composed", "/v1/attributes"):
        body = paths[path]["post"]["requestBody"]["content"]
        assert {"multipart/form-data", "application/json"} <= set(body)
        assert "image_b64" in body["application/json"]["schema"]["properties"]
    assert (
        "text"
        in paths["/v1/search/composed"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"][
            "required"
        ]
    )
    assert paths["/v1/search"]["post"]["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/SearchResponse"
    }
    assert {"/healthz", "/v1/models", "/v1/items", "/v1/items/{item_id}"} <= set(paths)


# ------------------------------------------------------------------------------ client mistakes
def _png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (10, 20, 30)).save(buf, format="PNG")
    return buf.getvalue()


def bomb_png() -> bytes:
    """A PNG whose header says 20,000 x 20,000 (400 MP) -- the first rows of pixels compress to a few kB
    (the full image would be ~390 kB at this compression): refused from its header, never decoded."""
    import struct
    import zlib

    width = height = 20_000
    row = b"\x00" + b"\x00" * width  # filter byte + one grey byte per pixel
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(500)) + compressor.flush()

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (
            struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def test_every_client_mistake_is_a_4xx_json_error_and_the_service_survives(served: Served) -> None:
    url = served.url
    good = served.records["item-1"].image
    too_big = encode_jpeg(
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (400, 400, 3), dtype=np.uint8))
    )
    assert len(too_big) > MAX_IMAGE_BYTES
    bomb = bomb_png()
    assert len(bomb) < MAX_IMAGE_BYTES  # small on the wire: only the pixel count gives it away
    b64 = base64.b64encode(good).decode()
    cases = [
        ("not an image", "post", "/v1/search", multipart(b"hello, this is text"), 400),
        ("truncated JPEG", "post", "/v1/search", multipart(good[: len(good) // 2]), 400),
        ("decompression bomb", "post", "/v1/search", multipart(bomb), 400),
        ("bomb to attributes", "post", "/v1/attributes", multipart(bomb), 400),
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
        ("empty image", "post", "/v1/search", multipart(b""), 400),
        ("k = 0", "post", "/v1/search", multipart(good, k="0"), 400),
        ("k < 0", "post", "/v1/search/composed", multipart(good, k="-3", text="in red"), 400),
        ("k > max_k", "post", "/v1/search", multipart(good, k=str(MAX_K + 1)), 400),
        ("k not a number", "post", "/v1/search", {"json": {"image_b64": b64, "k": "ten"}}, 400),
        ("k fractional", "post", "/v1/search?k=2.5", multipart(good), 400),
        ("empty text", "post", "/v1/search/composed", multipart(good, text=""), 400),
        ("blank text", "post", "/v1/search/composed", {"json": {"image_b64": b64, "text": "   "}}, 400),
        ("no text", "post", "/v1/search/composed", multipart(good), 400),
        ("10 kB of text", "post", "/v1/search/composed", multipart(good, text="red " * 2500), 400),
        ("text not a string", "post", "/v1/search/composed", {"json": {"image_b64": b64, "text": 5}}, 400),
        (
            "invalid JSON",
            "post",
            "/v1/search",
            {"content": b"{nope", "headers": {"content-type": "application/json"}},
            400,
        ),
        ("JSON without image", "post", "/v1/embed", {"json": {"k": 3}}, 400),
        ("JSON unknown field", "post", "/v1/embed", {"json": {"image": "abc"}}, 400),
        ("text on /v1/search", "post", "/v1/search", {"json": {"image_b64": b64, "text": "red"}}, 400),
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
        ("bad items page", "get", "/v1/items?limit=0", {}, 422),
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
        if name == "10 kB of text":
            assert "above the limit of 200" in response.json()["error"]
        if name == "decompression bomb":
            assert "400000000 pixels" in response.json()["error"]

    assert httpx.get(f"{url}/healthz", timeout=30).json() == {"status": "ok"}
    after = httpx.post(f"{url}/v1/search", **multipart(good, k="1"), timeout=60)
    assert after.status_code == 200 and after.json()["results"][0]["item_id"] == "item-1"


# ---------------------------------------------------------------------------- version pairing
def test_an_index_of_another_model_is_refused(served: Served) -> None:
    from visuray.serving.deployments import build_app

    other_version = save_tiny_model(str(served.tmp / "other-model"), seed=5)
    args = served.args.model_copy(update={"ensemble": None, "model": str(served.tmp / "other-model")})
    with pytest.raises(IncompatibleIndexError, match=f"built with model version '{served.model_version}'"):
        build_app(args)
    # The ensemble's own member alone is another vector space too: its index is refused for the ensemble.
    member = served.args.model_copy(update={"ensemble": None, "model": str(served.tmp / "model0")})
    with pytest.raises(IncompatibleIndexError, match=served.model_version):
        build_app(member)
    assert other_version != served.model_version
    assert httpx.get(f"{served.url}/healthz", timeout=30).status_code == 200


def test_search_replica_reconfigure_swaps_and_refuses(served: Served, tmp_path: Path) -> None:
    """In process: reconfigure loads a compatible index beside the old one, and keeps the old on a mismatch."""
    import asyncio

    from visuray.serving.args import BatchSettings
    from visuray.serving.deployments import Search

    replica = Search.func_or_class(served.args.storage, served.model_version, 32, BatchSettings(), 1)
    vectors = np.random.default_rng(0).standard_normal((5, 32)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    good = publish_test_index(str(tmp_path / "good"), vectors, list("abcde"), served.model_version, "c")
    wrong_dim = publish_test_index(
        str(tmp_path / "dim"), vectors[:, :16].copy(), list("abcde"), served.model_version, "c"
    )
    wrong_model = publish_test_index(str(tmp_path / "model"), vectors, list("abcde"), "model-x", "c")

    async def scenario() -> None:
        await replica.reconfigure({"index": str(served.tmp / "index")})
        assert replica.info()["version"] == served.index_version
        await replica.reconfigure({"index": good.uri})
        assert replica.info()["version"] == good.manifest.version and replica.info()["reload_error"] is None
        for bad, reason in ((wrong_dim, "16-d"), (wrong_model, "model-x")):
            await replica.reconfigure({"index": bad.uri})
            info = replica.info()
            assert info["version"] == good.manifest.version and reason in info["reload_error"]

    asyncio.run(scenario())
    with pytest.raises(IncompatibleIndexError, match="model-x"):  # a replica with nothing to fall back on
        fresh = Search.func_or_class(served.args.storage, served.model_version, 32, BatchSettings(), 1)
        asyncio.run(fresh.reconfigure({"index": wrong_model.uri}))


@pytest.mark.slow  # deploys a second application (~25 s on 2 cores)
def test_optional_deployments_answer_503_when_not_configured(served: Served) -> None:
    from ray import serve

    from visuray.serving.deployments import build_app

    args = served.args.model_copy(
        update={"fusion": None, "attributes": None, "index_reload_interval_s": None}
    )
    serve.run(build_app(args), name="bare", route_prefix="/bare", blocking=False)
    try:
        wait_until_healthy(f"{served.url}/bare/healthz")
        image = served.records["item-0"].image
        for path, fields in (("/bare/v1/search/composed", {"text": "in red"}), ("/bare/v1/attributes", {})):
            response = httpx.post(f"{served.url}{path}", **multipart(image, **fields), timeout=60)
            assert_client_error(response, 503)
            assert "not configured" in response.json()["error"]
        assert (
            httpx.post(f"{served.url}/bare/v1/search", **multipart(image, k="1"), timeout=60).status_code
            == 200
        )
        models = httpx.get(f"{served.url}/bare/v1/models", timeout=30).json()
        assert models["fusion"] is None and models["attributes"] is None
    finally:
        serve.delete("bare")


def wait_until_healthy(url: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=10).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer 200 in {timeout_s}s")


def test_serve_config_file_deploys_through_rays_own_builder_path(served: Served) -> None:
    """serve/config.yaml is a valid Serve config whose import path and args build this application."""
    from ray._common.utils import import_attr
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load(CONFIG_FILE.read_text())
    app = ServeDeploySchema.model_validate(config).applications[0]
    assert app.import_path == "serve.app:build_app" and app.route_prefix == "/"
    names = {d.name for d in app.deployments}
    assert names == {"EmbeddingEnsemble", "Search", "Fusion", "ComposedSearch", "Attributes", "Router"}
    for deployment in app.deployments:
        assert (
            deployment.autoscaling_config
            and deployment.max_ongoing_requests
            and deployment.max_queued_requests
        )

    builder = import_attr(app.import_path)
    tmp = served.tmp
    args = config_app_args(
        model=str(tmp / "model0"),
        index=str(tmp / "index-model0"),
        fusion={"model": str(tmp / "fusion"), "index": str(tmp / "fusion-index")},
        attributes={"model": str(tmp / "attributes")},
    )
    # An index of model0 alone: a one-model app (its ensemble version is model0's version).
    single = EmbeddingEnsemble.load(EnsembleSpec(members=[EnsembleMember(uri=str(tmp / "model0"))]))
    vectors = single.embed([decode_image(r.image) for r in served.records.values()])
    publish_test_index(
        str(tmp / "index-model0"), vectors, list(served.records), single.version, str(tmp / "catalog")
    )
    application = call_user_app_builder_with_args_if_necessary(builder, args)
    deployed = {d.name for d in _deployments_of(application)}
    assert deployed == names, "the config's deployments section must name exactly the deployments built"
    with pytest.raises(Exception, match="unknown_knob"):
        call_user_app_builder_with_args_if_necessary(builder, {**args, "unknown_knob": 1})


def _deployments_of(application: Any) -> list[Any]:
    """Every deployment bound into an application (the ingress and its handle arguments, recursively)."""
    from ray.serve._private.build_app import build_app as flatten

    return flatten(application, name="check").deployments


# ------------------------------------------------------------------------------------- hot swap
def test_index_hot_swap_under_concurrent_requests_drops_nothing(served: Served) -> None:
    """Publish a new index version while 4 clients query continuously: every answer is 2xx, answers
    switch to the new version, /v1/models (cached by the router) follows, and latency is recorded
    (printed with -s)."""
    record = served.records["item-8"]
    stop = threading.Event()
    results: list[tuple[int, str | None, float]] = []
    lock = threading.Lock()

    def client() -> None:
        with httpx.Client(timeout=60) as http:
            while not stop.is_set():
                started = time.monotonic()
                response = http.post(f"{served.url}/v1/search", **multipart(record.image, k="3"))
                version = response.json().get("index_version") if response.status_code == 200 else None
                with lock:
                    results.append((response.status_code, version, time.monotonic() - started))

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(2)
        # Fills the router's /v1/models cache with the old version, kept far longer than this test runs.
        assert served.args.models_cache_ttl_s == MODELS_CACHE_TTL_S
        models = httpx.get(f"{served.url}/v1/models", timeout=30).json()
        assert models["index"]["version"] == served.index_version
        # The new version: the same vectors in an HNSW index (a different file, the same neighbours).
        embedder = EmbeddingEnsemble.load(served.ensemble)
        records = list(served.records.values())
        new = publish_test_index(
            str(served.tmp / "index"),
            embedder.embed([decode_image(r.image) for r in records]),
            [r.item_id for r in records],
            served.model_version,
            str(served.tmp / "catalog"),
            factory="HNSW32",
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with lock:
                if any(v == new.manifest.version for _, v, _ in results[-4:]):
                    break
            time.sleep(0.2)
        time.sleep(1.5)
    finally:
        stop.set()
        for t in threads:
            t.join()
    statuses = [s for s, _, _ in results]
    versions = [v for _, v, _ in results]
    latencies = sorted(d for _, _, d in results)
    print(
        f"\nhot swap: {len(results)} requests, {sum(s >= 300 for s in statuses)} non-2xx, "
        f"p50 {statistics.median(latencies) * 1000:.0f} ms, p95 {latencies[int(0.95 * len(latencies))] * 1000:.0f} ms"
    )
    assert len(results) >= 20 and all(200 <= s < 300 for s in statuses), [s for s in statuses if s >= 300][:5]
    assert served.index_version in versions and versions[-1] == new.manifest.version
    # Search answers from the new version made the router drop its cached answer: no expiry needed.
    models = httpx.get(f"{served.url}/v1/models", timeout=30).json()
    assert models["index"]["version"] == new.manifest.version
    assert models["model"]["version"] == served.model_version
    assert models["fusion"]["index"]["model_version"] == served.fusion_version


# ------------------------------------------------------------------- Ray's throughput-optimised mode
@pytest.mark.slow
def test_throughput_optimised_mode_answers_directly_and_through_the_proxy(served: Served) -> None:
    """``visuray serve`` turns on ``RAY_SERVE_THROUGHPUT_OPTIMIZED`` by default (gRPC between
    deployments, user code on the replica's own event loop, direct ingress to the router replica): on its
    own embedded cluster it prints the router replica's direct address beside the proxy's, and both answer
    like the session's application (numpy pixels, vectors and errors cross gRPC instead of actor calls).
    Then SIGTERM stops it cleanly."""
    import os
    import signal
    import subprocess
    import sys

    config = served.tmp / "throughput-optimised.yaml"
    config.write_text(yaml.safe_dump(served.args.model_dump(mode="json")))
    # Its own cluster, not the session's; and the CLI's own default for the mode, not the session's.
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_SERVE_THROUGHPUT_OPTIMIZED")}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "visuray.cli",
            "serve",
            str(config),
            "--port",
            str(free_port()),
            "--num-cpus",
            "4",
        ],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    urls: dict[str, str] = {}
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 400
        while "direct" not in urls and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break  # exited
            lines.append(line)
            if line.startswith("serving on "):
                urls["proxy"] = line.split()[2]
            elif line.startswith("direct ingress: "):
                urls["direct"] = line.split()[2]
        assert set(urls) == {"proxy", "direct"}, "".join(lines[-30:])
        assert urls["direct"] != urls["proxy"]

        image = served.records["item-5"].image
        reference = reference_ensemble_vector(served, image)
        for via, url in urls.items():
            embedded = httpx.post(f"{url}/v1/embed", **multipart(image), timeout=60)
            assert embedded.status_code == 200, (via, embedded.text)
            np.testing.assert_allclose(embedded.json()["embedding"], reference, atol=1e-5)
            found = httpx.post(f"{url}/v1/search", **multipart(image, k="3"), timeout=60).json()
            assert found["results"][0]["item_id"] == "item-5", (via, found)
            composed = httpx.post(f"{url}/v1/search/composed", **multipart(image, text="in red"), timeout=60)
            attributes = httpx.post(f"{url}/v1/attributes", **multipart(image), timeout=60)
            assert composed.status_code == 200 and attributes.status_code == 200, (via, composed.text)
            assert_client_error(httpx.post(f"{url}/v1/search", **multipart(b"not an image"), timeout=60), 400)

        # SIGTERM (what Kubernetes and systemd send): Serve and the embedded cluster shut down, exit 0
        # within 30 s, one line saying so.
        stopping = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=60)
        took = time.monotonic() - stopping
        assert proc.returncode == 0 and took < 30, (proc.returncode, took, rest[-3000:])
        stopped = [line for line in rest.splitlines() if line.startswith("stopped on SIGTERM")]
        assert len(stopped) == 1 and "Serve and the Ray cluster shut down" in stopped[0], rest[-3000:]
        with pytest.raises(httpx.TransportError):  # nothing answers any more
            httpx.get(f"{urls['proxy']}/healthz", timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_the_test_session_serves_on_the_throughput_optimised_path(served: Served) -> None:
    """conftest turns the mode on before anything imports Ray, as the CLI does: the session's application
    runs it (its router replica answers on a port of its own, like the proxy) and this driver's Serve was
    imported with it, so the other Serve tests exercise the path users get."""
    from ray.serve._private import constants

    from visuray.cluster import serve_env_mismatch
    from visuray.serving import direct_ingress_urls

    assert constants.RAY_SERVE_THROUGHPUT_OPTIMIZED and serve_env_mismatch() is None
    (direct,) = direct_ingress_urls("visuray-test")  # the shared application has one router replica
    assert direct != served.url
    image = served.records["item-5"].image
    answers = [httpx.post(f"{url}/v1/embed", **multipart(image), timeout=60) for url in (direct, served.url)]
    assert [a.status_code for a in answers] == [200, 200]
    assert answers[0].json() == answers[1].json()


@pytest.mark.parametrize(("before", "after", "warned"), [("0", "1", True), ("1", "1", False)])
def test_a_serve_imported_before_its_mode_was_set_is_reported(before: str, after: str, warned: bool) -> None:
    """Serve fixes its request path when imported; a deploying process that imported it under another
    setting than its environment now asks for is told so (its handles would use the slower path)."""
    import os
    import subprocess
    import sys

    script = (
        "import os, ray.serve\n"
        f"os.environ['RAY_SERVE_THROUGHPUT_OPTIMIZED'] = {after!r}\n"
        "from visuray.cluster import serve_env_mismatch\n"
        "print(serve_env_mismatch())\n"
    )
    env = {**os.environ, "RAY_SERVE_THROUGHPUT_OPTIMIZED": before}
    out = (
        subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True, timeout=120
        )
        .stdout.strip()
        .splitlines()[-1]
    )
    if warned:
        assert "imported when it was off" in out and "before importing Ray" in out, out
    else:
        assert out == "None"


def test_an_application_whose_replicas_cannot_be_placed_says_which_and_is_deleted(served: Served) -> None:
    """A second application whose embedder asks for a GPU this cluster lacks: start_serve_app gives up
    once Serve reports its replicas waiting to be scheduled (after 3 s in the tests, 30 s by default),
    names the deployment, what each replica asks for and the setting that fixes it, and deletes the
    application; the session's application goes on answering."""
    from ray import serve

    from visuray.serving.start import ServeAppDidNotStartError, start_serve_app

    embedder = served.args.embedder.model_copy(update={"num_gpus": 1.0})
    wants_a_gpu = served.args.model_copy(update={"embedder": embedder})
    started = time.monotonic()
    with pytest.raises(ServeAppDidNotStartError) as caught:
        start_serve_app(
            wants_a_gpu, port=free_port(), name="unplaceable", route_prefix="/unplaceable",
            schedule_wait_s=0, timeout_s=120, access_log=False,
        )  # fmt: skip
    message = str(caught.value)
    assert time.monotonic() - started < 60, message
    assert 'did not start: replicas of EmbeddingEnsemble (1 replica(s), each asking {"CPU": 0.25, "GPU": 1.0}) wait to be scheduled; the cluster has {"CPU": ' in message, message  # fmt: skip
    assert "reserve 1 GPUs" in message and "num_gpus" in message, message  # what fixes it
    assert "unplaceable" not in serve.status().applications
    assert httpx.get(f"{served.url}/healthz", timeout=10).status_code == 200


@pytest.mark.slow
def test_the_shipped_serve_config_deploys_on_a_cluster_answers_and_runs_its_autoscaling(
    served: Served, ray_head: object
) -> None:
    """serve/config.yaml, deployed as written with Serve's own `serve deploy` onto a `ray start` cluster
    (only `args` point at the test's artifacts, and the port is a free one): it answers a search over
    HTTP, and every deployment's autoscaling and request limits, read back from the running
    application through the dashboard, are the file's."""
    import subprocess
    import sys

    from tests.ray_head import RayHead

    assert isinstance(ray_head, RayHead)
    config = yaml.safe_load(CONFIG_FILE.read_text())
    port = free_port()
    config["http_options"] = {"host": "127.0.0.1", "port": port}
    app = config["applications"][0]
    artifacts = served.args.model_dump(mode="json")
    keys = ("model", "ensemble", "index", "catalog", "fusion", "attributes")
    app["args"] = config_app_args(**{key: artifacts[key] for key in keys})
    app["runtime_env"] = {"env_vars": {"PYTHONPATH": str(REPO_ROOT)}}  # where `serve.app` is
    path = served.tmp / "deployed-config.yaml"
    path.write_text(yaml.safe_dump(config))
    env, serve_cli = ray_head.client_env(), str(Path(sys.executable).parent / "serve")
    address = ["--address", ray_head.dashboard_url]
    deployed = subprocess.run(
        [serve_cli, "deploy", str(path), *address], env=env, capture_output=True, text=True, timeout=120
    )
    assert deployed.returncode == 0, deployed.stderr[-3000:]
    try:
        auth = {"Authorization": f"Bearer {ray_head.token}"}
        deadline, application = time.monotonic() + 300, {}
        while application.get("status") != "RUNNING" and time.monotonic() < deadline:
            time.sleep(1)
            details = httpx.get(f"{ray_head.dashboard_url}/api/serve/applications/", headers=auth, timeout=30)
            application = details.json()["applications"].get("visuray", {})
        assert application.get("status") == "RUNNING", application.get("message")
        url = f"http://127.0.0.1:{port}"
        found = httpx.post(f"{url}/v1/search", **multipart(served.records["item-5"].image, k="3"), timeout=60)
        assert found.status_code == 200 and found.json()["results"][0]["item_id"] == "item-5", found.text

        running = application["deployments"]
        for written in app["deployments"]:
            live = running[written["name"]]
            assert live["status"] == "HEALTHY", (written["name"], live["message"])
            live_config = live["deployment_config"]
            for key, value in written["autoscaling_config"].items():
                assert live_config["autoscaling_config"][key] == value, (written["name"], key)
            assert live_config["max_ongoing_requests"] == written["max_ongoing_requests"]
            assert live_config["max_queued_requests"] == written["max_queued_requests"]
            assert live_config["ray_actor_options"]["num_cpus"] == written["ray_actor_options"]["num_cpus"]
    finally:
        subprocess.run([serve_cli, "shutdown", "-y", *address], env=env, capture_output=True, timeout=120)
