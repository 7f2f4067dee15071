"""The library side of the Serve application: typed app arguments, response models and pure helpers.

The deployments themselves live in :mod:`visuray.serving_app` (which imports Ray Serve and FastAPI);
``serve/app.py`` is the thin application module that ``serve run`` / ``serve deploy`` import. This module
stays light (no torch, faiss or Ray at import) because the CLI and the demo import it to start Serve.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, Field

from visuray.config import StrictModel
from visuray.images import DEFAULT_MAX_PIXELS
from visuray.storage import Artifact, ArtifactError, StorageOptions, resolve_artifact

log = logging.getLogger(__name__)

MiB = 1 << 20


# ------------------------------------------------------------------------------------------ app args
class AutoscalingSettings(StrictModel):
    """Ray Serve autoscaling for one deployment (replicas follow ongoing requests per replica)."""

    min_replicas: int = Field(1, ge=0, description="1 keeps a warm replica; 0 saves resources when idle")
    max_replicas: int = Field(4, ge=1, description="cap; raise it to the GPUs/CPUs the cluster can give")
    target_ongoing_requests: float = Field(
        2.0, gt=0, description="Serve's default: a replica with ~2 requests in flight is busy enough to batch"
    )
    upscale_delay_s: float = Field(10.0, ge=0, description="short: scale up quickly when queues build")
    downscale_delay_s: float = Field(300.0, ge=0, description="long: model loads are slow, avoid flapping")

    def to_serve(self) -> dict[str, Any]:
        return self.model_dump()


class DeploymentSettings(StrictModel):
    """Replicas, admission control and resources of one deployment."""

    num_replicas: int = Field(1, ge=1, description="fixed replica count, used when autoscaling is unset")
    autoscaling: AutoscalingSettings | None = None  # set: replicas follow load between min and max
    max_ongoing_requests: int = Field(
        16, ge=1, description="requests a replica works on at once; at least the batch size so batches fill"
    )
    max_queued_requests: int = Field(
        256, ge=-1, description="requests waiting per caller before Serve answers 503 (-1: no limit)"
    )
    num_cpus: float = Field(0.5, ge=0, description="0.5 lets all three deployments fit a 2-core test cluster")
    num_gpus: float = Field(0, ge=0, description="1 on GPU nodes for the embedder; search runs on CPU")

    def to_serve(self) -> dict[str, Any]:
        options: dict[str, Any] = {
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus},
        }
        if self.autoscaling is not None:
            options["autoscaling_config"] = self.autoscaling.to_serve()
        else:
            options["num_replicas"] = self.num_replicas
        return options


class BatchSettings(StrictModel):
    """Dynamic batching (``@serve.batch``): requests arriving together share one forward pass."""

    max_batch_size: int = Field(16, ge=1, description="16 images of 64-224 px fit any CPU/GPU replica")
    batch_wait_timeout_s: float = Field(
        0.01, ge=0, description="10 ms: a lone request waits at most this long for company"
    )


class ServeAppArgs(StrictModel):
    """Arguments of the Serve application (``args:`` in serve/config.yaml, or built in Python)."""

    model: str = Field(description="embedding model checkpoint URI (root or version folder)")
    index: str = Field(description="index URI built from that model (root or version folder)")
    catalog: str | None = Field(
        None,
        description="catalog URI for item metadata and images; None: the catalog the index was built from",
    )
    storage: StorageOptions = Field(default_factory=StorageOptions)  # how to reach s3:// URIs

    max_k: int = Field(100, ge=1, description="largest k a client may ask for; bounds the work per query")
    default_k: int = Field(10, ge=1, description="k when the request does not say")
    max_image_bytes: int = Field(10 * MiB, ge=1024, description="10 MiB fits any phone photo")
    max_image_pixels: int = Field(
        DEFAULT_MAX_PIXELS, ge=1, description="decompression-bomb guard: 40 MP accepts camera photos"
    )
    image_cache_shards: int = Field(
        4, ge=1, description="catalog shards whose images the router keeps for /v1/items/{id}/image"
    )

    embed_batch: BatchSettings = Field(default_factory=BatchSettings)
    search_batch: BatchSettings = Field(
        default_factory=lambda: BatchSettings(max_batch_size=32, batch_wait_timeout_s=0.005),
        description="FAISS searches a batch of queries far cheaper than one by one; batches are cheap to wait for",
    )
    embedder: DeploymentSettings = Field(default_factory=DeploymentSettings)
    search: DeploymentSettings = Field(
        default_factory=lambda: DeploymentSettings(max_ongoing_requests=64),
        description="at least search_batch.max_batch_size requests in flight, or batches never fill",
    )
    router: DeploymentSettings = Field(
        default_factory=lambda: DeploymentSettings(max_ongoing_requests=64, num_cpus=0.25),
        description="the router only parses, decodes and forwards: many requests per replica, few CPUs",
    )


# ------------------------------------------------------------------------------------ responses
class SearchHit(BaseModel):
    item_id: str
    score: float
    label: str | None = None
    title: str | None = None
    category: str | None = None


class SearchResponse(BaseModel):
    model_version: str
    index_version: str
    k: int
    results: list[SearchHit]


class EmbedResponse(BaseModel):
    model_version: str
    dim: int
    embedding: list[float]


class ItemResponse(BaseModel):
    item_id: str
    label: str | None = None
    category: str | None = None
    title: str | None = None
    description: str | None = None
    attributes: dict[str, Any] = Field(default_factory=dict)
    image_url: str


# ------------------------------------------------------------------------------------- helpers
class ClientError(Exception):
    """A request the client must fix; the router answers ``status`` with ``{"error": message}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class IncompatibleIndexError(ValueError):
    """An index built with another model (version or dimension) than the one being served."""


def check_index_matches_model(index_meta: Mapping[str, Any], model_meta: Mapping[str, Any]) -> None:
    """Refuse an index whose vectors come from another model: their neighbours would be meaningless."""
    index_version, model_version = index_meta.get("model_version"), model_meta.get("model_version")
    if index_version != model_version:
        raise IncompatibleIndexError(
            f"the index was built with model version {index_version!r} but the served model is "
            f"{model_version!r}: rebuild the index with this model (jobs/build_index.py) or serve the "
            "model the index was built with"
        )
    if index_meta.get("dim") != model_meta.get("embedding_dim"):
        raise IncompatibleIndexError(
            f"the index holds {index_meta.get('dim')}-d vectors but the model emits "
            f"{model_meta.get('embedding_dim')}-d embeddings"
        )


def parse_k(value: Any, default_k: int, max_k: int) -> int:
    """The requested k as an int in [1, max_k]; anything else is a 400 naming the allowed range."""
    if value is None or value == "":
        return default_k
    if isinstance(value, bool):
        raise ClientError(400, f"k must be an integer between 1 and {max_k}, got {value!r}")
    try:
        k = int(value)
        if isinstance(value, float) and value != k:
            raise ValueError
    except (TypeError, ValueError):
        raise ClientError(400, f"k must be an integer between 1 and {max_k}, got {value!r}") from None
    if not 1 <= k <= max_k:
        raise ClientError(400, f"k must be between 1 and {max_k}, got {k}")
    return k


def decode_base64_image(text: Any, max_bytes: int) -> bytes:
    """The bytes of a base64 image field (a ``data:image/...;base64,`` prefix is allowed)."""
    if not isinstance(text, str) or not text:
        raise ClientError(400, "image_b64 must be a non-empty base64 string")
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    if len(text) > (max_bytes + 2) // 3 * 4 + 4:
        raise ClientError(413, f"image is larger than the limit of {max_bytes} bytes")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ClientError(400, "image_b64 is not valid base64") from None
    if len(data) > max_bytes:
        raise ClientError(413, f"image is larger than the limit of {max_bytes} bytes")
    return data


def parse_json_query(body: bytes, max_bytes: int) -> tuple[bytes, Any]:
    """``{"image_b64": ..., "k": ...}`` -> (image bytes, raw k)."""
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ClientError(400, f"request body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise ClientError(400, 'request body must be a JSON object like {"image_b64": "...", "k": 10}')
    unknown = sorted(set(payload) - {"image_b64", "k"})
    if unknown:
        raise ClientError(400, f"unknown field(s) {unknown}; expected image_b64 and optionally k")
    return decode_base64_image(payload.get("image_b64"), max_bytes), payload.get("k")


def image_media_type(data: bytes) -> str:
    """The media type of encoded image bytes, from their magic number."""
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return "application/octet-stream"


class CatalogItems:
    """Item metadata of a catalog in memory, and item images read on demand (a few shards cached).

    Metadata (ids, labels, titles...) is small and answers every search; image bytes are only needed
    for ``/v1/items/{id}/image``, so they stay in storage and are read shard by shard, checksum-verified.
    """

    META_COLUMNS = ["item_id", "label", "category", "title", "description", "attributes"]

    def __init__(self, catalog: Artifact, cache_shards: int = 4) -> None:
        import pyarrow.parquet as pq

        if catalog.manifest.kind != "catalog":
            raise ArtifactError(f"{catalog.uri} is a {catalog.manifest.kind!r} artifact, not a catalog")
        self.artifact = catalog
        self.version = catalog.manifest.version
        self._cache_shards = cache_shards
        self._images: OrderedDict[str, list[bytes]] = OrderedDict()
        self._rows: dict[str, dict[str, Any]] = {}
        self._where: dict[str, tuple[str, int]] = {}  # item_id -> (shard, row in shard)
        for shard in sorted(n for n in catalog.manifest.files if n.endswith(".parquet")):
            table = pq.read_table(io.BytesIO(catalog.read(shard)), columns=self.META_COLUMNS)
            for row, record in enumerate(table.to_pylist()):
                record["attributes"] = json.loads(record["attributes"]) if record["attributes"] else {}
                self._rows[record["item_id"]] = record
                self._where[record["item_id"]] = (shard, row)

    @classmethod
    def load(cls, uri: str, options: StorageOptions | None = None, cache_shards: int = 4) -> CatalogItems:
        started = time.monotonic()
        items = cls(resolve_artifact(uri, options), cache_shards)
        log.info("loaded %d catalog items from %s in %.1fs", len(items), uri, time.monotonic() - started)
        return items

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._rows

    def get(self, item_id: str) -> dict[str, Any] | None:
        return self._rows.get(item_id)

    def image(self, item_id: str) -> bytes:
        """The encoded image of ``item_id`` as ingested; KeyError for an unknown id."""
        import pyarrow.parquet as pq

        shard, row = self._where[item_id]
        images = self._images.get(shard)
        if images is None:
            table = pq.read_table(io.BytesIO(self.artifact.read(shard)), columns=["image"])
            images = table.column("image").to_pylist()
            self._images[shard] = images
            while len(self._images) > self._cache_shards:
                self._images.popitem(last=False)
        self._images.move_to_end(shard)
        return images[row]


def start_serve_app(
    args: ServeAppArgs,
    host: str = "127.0.0.1",
    port: int = 8000,
    name: str = "visuray",
    timeout_s: float = 180.0,
    access_log: bool = True,
) -> str:
    """Deploy the application on the connected Ray cluster and return its base URL once /healthz answers.

    ``access_log=False`` keeps Serve's per-request log lines out of the console (the demo prints its own).

    Call :func:`visuray.cluster.ensure_ray` first. Serve's HTTP options are cluster-wide and fixed when
    Serve first starts: a Serve instance already running keeps its host and port.
    """
    import httpx
    from ray import serve

    from visuray.serving_app import build_app

    logging_config = None if access_log else {"enable_access_log": False, "log_level": "WARNING"}
    serve.start(http_options={"host": host, "port": port}, logging_config=logging_config)
    serve.run(build_app(args), name=name, route_prefix="/", blocking=False, logging_config=logging_config)
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
