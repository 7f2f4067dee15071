"""The Ray Serve deployments: ``Embedder`` and ``Search`` behind one FastAPI ``Router``, and the app builder.

Request path: the router reads and validates the upload, decodes it (the same ``decode_image`` as ingest),
hands the decoded pixels to the embedder (``@serve.batch``: concurrent queries share one forward pass
through ``to_model_input``, the index job's preprocessing), then the embedding to the search deployment
(batched FAISS search), and names the hits with catalog metadata.

Every client mistake (not an image, truncated file, too many pixels, payload too large, bad ``k``,
unknown item) is answered 4xx with ``{"error": ...}``. Models and indexes load in the deployments'
constructors, never at import. No ``from __future__ import annotations`` here: FastAPI and Serve's app
builder read these annotations as real types.
"""

import asyncio
import logging
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException

from visuray.images import ImageDecodeError, decode_image
from visuray.serving import (
    BatchSettings,
    CatalogItems,
    ClientError,
    EmbedResponse,
    ItemResponse,
    SearchHit,
    SearchResponse,
    ServeAppArgs,
    check_index_matches_model,
    image_media_type,
    parse_json_query,
    parse_k,
)
from visuray.storage import StorageOptions, absolute_uri

log = logging.getLogger(__name__)

# Multipart boundaries and headers add a little to an upload; base64 adds a third.
_ENVELOPE_BYTES = 64 * 1024


def _threads_for(num_cpus: float) -> int:
    return max(1, int(num_cpus))


# ------------------------------------------------------------------------------------- Embedder
@serve.deployment(name="Embedder")
class Embedder:
    """The embedding model; ``embed(pixels)`` -> one L2-normalised embedding as a list of floats."""

    def __init__(
        self,
        model_uri: str,
        storage: StorageOptions,
        expected_version: str,
        batch: BatchSettings,
        num_threads: int,
    ) -> None:
        import torch

        from visuray.checkpoint import load_embedding_model

        torch.set_num_threads(num_threads)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model, artifact = load_embedding_model(model_uri, storage, map_location=self.device)
        meta = artifact.manifest.metadata
        if meta["model_version"] != expected_version:
            raise ValueError(f"{model_uri} holds model {meta['model_version']}, expected {expected_version}")
        self.model_version: str = meta["model_version"]
        self.dim = int(meta["embedding_dim"])
        self.img_size = int(meta["img_size"])
        self.info_dict = {
            "version": self.model_version,
            "uri": artifact.uri,
            "embedding_dim": self.dim,
            "img_size": self.img_size,
            "backbone": meta.get("backbone"),
            "device": self.device,
        }
        self.embed.set_max_batch_size(batch.max_batch_size)
        self.embed.set_batch_wait_timeout_s(batch.batch_wait_timeout_s)
        log.info("embedder ready: model %s (dim %d) on %s", self.model_version, self.dim, self.device)

    def info(self) -> dict[str, Any]:
        return self.info_dict

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def embed(self, pixels: list[np.ndarray]) -> list[list[float]]:
        # The forward pass runs off the event loop so the replica keeps answering health checks.
        return await asyncio.to_thread(self._embed_now, pixels)

    def _embed_now(self, pixels: list[np.ndarray]) -> list[list[float]]:
        import torch
        from PIL import Image

        from visuray.images import to_model_input

        images = [Image.fromarray(p) for p in pixels]
        with torch.inference_mode():
            out = self.model(to_model_input(images, self.img_size).to(self.device))
        return out.float().cpu().tolist()


# --------------------------------------------------------------------------------------- Search
@serve.deployment(name="Search")
class Search:
    """The FAISS index; ``search(vector, k)`` -> ``{"ids": [...], "scores": [...]}``, best first."""

    def __init__(
        self,
        index_uri: str,
        storage: StorageOptions,
        model_version: str,
        embedding_dim: int,
        batch: BatchSettings,
        num_threads: int,
    ) -> None:
        import faiss

        from visuray.index.faiss_index import SearchIndex

        faiss.omp_set_num_threads(num_threads)
        self.index = SearchIndex.load(index_uri, storage)
        # The same check as the builder, against what was actually loaded: never serve foreign vectors.
        check_index_matches_model(
            {"model_version": self.index.model_version, "dim": self.index.dim},
            {"model_version": model_version, "embedding_dim": embedding_dim},
        )
        self.info_dict = {
            "version": self.index.version,
            "uri": self.index.artifact.uri,
            "model_version": self.index.model_version,
            "count": len(self.index),
            "dim": self.index.dim,
            "metric": self.index.metric,
            "factory": self.index.factory,
        }
        self.search.set_max_batch_size(batch.max_batch_size)
        self.search.set_batch_wait_timeout_s(batch.batch_wait_timeout_s)
        log.info("search ready: index %s, %d items", self.index.version, len(self.index))

    def info(self) -> dict[str, Any]:
        return self.info_dict

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def search(self, vectors: list[list[float]], ks: list[int]) -> list[dict[str, list]]:
        return await asyncio.to_thread(self._search_now, vectors, ks)

    def _search_now(self, vectors: list[list[float]], ks: list[int]) -> list[dict[str, list]]:
        ids, scores = self.index.search(np.asarray(vectors, dtype=np.float32), max(ks))
        return [
            {"ids": row_ids[:k], "scores": [float(s) for s in row_scores[: min(k, len(row_ids))]]}
            for row_ids, row_scores, k in zip(ids, scores, ks, strict=True)
        ]


# --------------------------------------------------------------------------------------- Router
api = FastAPI(
    title="Visuray visual search",
    description="Upload a product photo; get the most similar catalog items.",
    version="1",
)


@api.exception_handler(ClientError)
async def _client_error(request: Request, exc: ClientError) -> JSONResponse:
    return JSONResponse({"error": exc.message}, status_code=exc.status)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
    return JSONResponse({"error": f"invalid request: {problems}"}, status_code=422)


async def _parse_multipart(request: Request, body: bytes, max_bytes: int) -> tuple[bytes, Any]:
    """(image bytes, raw k) from a multipart form with a ``file`` (or ``image``) part and optional ``k``."""
    delivered = False

    async def replay() -> dict[str, Any]:  # the body was already read (with a size limit) by the caller
        nonlocal delivered
        if delivered:
            return {"type": "http.disconnect"}
        delivered = True
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=2, max_fields=8)
    except (MultiPartException, StarletteHTTPException) as exc:
        detail = getattr(exc, "message", None) or getattr(exc, "detail", "")
        raise ClientError(400, f"malformed multipart body: {detail}") from None
    try:
        upload = form.get("file") or form.get("image")
        if not isinstance(upload, UploadFile):
            raise ClientError(400, "multipart body needs an image file in a part named 'file'")
        data = await upload.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise ClientError(413, f"image is larger than the limit of {max_bytes} bytes")
        return data, form.get("k")
    finally:
        await form.close()


@serve.deployment(name="Router")
@serve.ingress(api)
class Router:
    """HTTP ingress: validates input, calls the embedder and the search deployment, names the hits."""

    def __init__(
        self,
        embedder: DeploymentHandle,
        search: DeploymentHandle,
        args: ServeAppArgs,
        catalog_uri: str,
        model_version: str,
        index_version: str,
    ) -> None:
        self.embedder = embedder
        self.search = search
        self.args = args
        self.model_version = model_version
        self.index_version = index_version
        self.items = CatalogItems.load(catalog_uri, args.storage, args.image_cache_shards)

    # ------------------------------------------------------------------ input
    async def _read_query(self, request: Request) -> tuple[bytes, Any]:
        """The query image bytes and raw ``k`` from multipart, JSON ``{"image_b64"}`` or a raw image body."""
        max_bytes = self.args.max_image_bytes
        body_limit = max_bytes * 4 // 3 + _ENVELOPE_BYTES
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > body_limit:
            raise ClientError(
                413, f"request body of {declared} bytes is above the limit of {body_limit} bytes"
            )
        body = bytearray()
        async for chunk in request.stream():  # bounded even when no Content-Length was sent
            body += chunk
            if len(body) > body_limit:
                raise ClientError(413, f"request body is above the limit of {body_limit} bytes")
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        k = request.query_params.get("k")
        if content_type == "multipart/form-data":
            data, form_k = await _parse_multipart(request, bytes(body), max_bytes)
        elif content_type == "application/json":
            data, form_k = parse_json_query(bytes(body), max_bytes)
        elif content_type.startswith("image/") or content_type == "application/octet-stream":
            data, form_k = bytes(body), None
            if len(data) > max_bytes:
                raise ClientError(413, f"image is larger than the limit of {max_bytes} bytes")
        else:
            raise ClientError(
                415,
                f"unsupported content type {content_type or '(none)'!r}: send multipart/form-data with a "
                '"file" part, JSON {"image_b64": ...}, or the raw image bytes',
            )
        return data, form_k if form_k is not None else k

    async def _embed(self, data: bytes) -> list[float]:
        try:
            image = await asyncio.to_thread(decode_image, data, self.args.max_image_pixels)
        except ImageDecodeError as exc:
            raise ClientError(400, str(exc)) from None
        return await self.embedder.embed.remote(np.asarray(image))

    # ------------------------------------------------------------------ routes
    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        model, index = await asyncio.gather(self.embedder.info.remote(), self.search.info.remote())
        return {
            "model": model,
            "index": index,
            "catalog": {"version": self.items.version, "count": len(self.items)},
        }

    @api.post("/v1/embed")
    async def embed(self, request: Request) -> EmbedResponse:
        data, _ = await self._read_query(request)
        vector = await self._embed(data)
        return EmbedResponse(model_version=self.model_version, dim=len(vector), embedding=vector)

    @api.post("/v1/search")
    async def search_items(self, request: Request) -> SearchResponse:
        data, raw_k = await self._read_query(request)
        k = parse_k(raw_k, self.args.default_k, self.args.max_k)
        vector = await self._embed(data)
        found = await self.search.search.remote(vector, k)
        hits = []
        for item_id, score in zip(found["ids"], found["scores"], strict=False):
            meta = self.items.get(item_id) or {}
            hits.append(
                SearchHit(
                    item_id=item_id,
                    score=score,
                    label=meta.get("label"),
                    title=meta.get("title"),
                    category=meta.get("category"),
                )
            )
        return SearchResponse(
            model_version=self.model_version, index_version=self.index_version, k=k, results=hits
        )

    # Registered before /v1/items/{item_id:path}: ids may contain "/" (folder-ingested catalogs).
    @api.get("/v1/items/{item_id:path}/image")
    async def item_image(self, item_id: str) -> Response:
        if item_id not in self.items:
            raise ClientError(404, f"unknown item id {item_id!r}")
        data = await asyncio.to_thread(self.items.image, item_id)
        return Response(content=data, media_type=image_media_type(data))

    @api.get("/v1/items/{item_id:path}")
    async def item(self, item_id: str) -> ItemResponse:
        meta = self.items.get(item_id)
        if meta is None:
            raise ClientError(404, f"unknown item id {item_id!r}")
        return ItemResponse(**meta, image_url=f"/v1/items/{item_id}/image")


# -------------------------------------------------------------------------------------- builder
def build_app(args: ServeAppArgs) -> Application:
    """The Serve application for ``args``: model, index and catalog pinned to their current versions.

    Raises :class:`visuray.serving.IncompatibleIndexError` before deploying anything when the index was
    built with another model (version or dimension). Reads only manifests: cheap, no model loads.
    """
    from visuray.checkpoint import resolve_model
    from visuray.storage import ArtifactError, resolve_artifact

    if isinstance(args, dict):  # a plain dict from Python callers; Serve's config path validates itself
        args = ServeAppArgs.model_validate(args)
    model = resolve_model(absolute_uri(args.model), args.storage)
    index = resolve_artifact(absolute_uri(args.index), args.storage)
    if index.manifest.kind != "index":
        raise ArtifactError(f"{args.index} is a {index.manifest.kind!r} artifact, not an index")
    check_index_matches_model(index.manifest.metadata, model.manifest.metadata)
    catalog_uri = args.catalog or index.manifest.metadata.get("catalog_uri")
    if not catalog_uri:
        raise ValueError("no catalog given and the index does not record the catalog it was built from")
    catalog = resolve_artifact(absolute_uri(catalog_uri), args.storage)
    built_from = index.manifest.metadata.get("catalog_version")
    if built_from and built_from != catalog.manifest.version:
        log.warning(
            "index %s was built from catalog version %s but catalog %s is served: items added since "
            "are not searchable, removed ones have no metadata",
            index.manifest.version,
            built_from,
            catalog.manifest.version,
        )
    model_version = model.manifest.metadata["model_version"]
    embedder = Embedder.options(**args.embedder.to_serve()).bind(
        model.uri, args.storage, model_version, args.embed_batch, _threads_for(args.embedder.num_cpus)
    )
    search = Search.options(**args.search.to_serve()).bind(
        index.uri,
        args.storage,
        model_version,
        int(model.manifest.metadata["embedding_dim"]),
        args.search_batch,
        _threads_for(args.search.num_cpus),
    )
    return Router.options(**args.router.to_serve()).bind(
        embedder, search, args, catalog.uri, model_version, index.manifest.version
    )
