"""The one HTTP ingress of the Serve application: a FastAPI ``Router`` deployment.

Routes: ``/`` (the web page), ``/healthz``, ``/v1/models``, ``/v1/embed``, ``/v1/search``,
``/v1/search/composed``, ``/v1/attributes``, ``/v1/items`` and ``/v1/items/{id}[/image]``; the OpenAPI
schema is FastAPI's ``/openapi.json``. The router parses and validates (:mod:`visuray.serving.schemas`),
decodes the image once, and forwards pixels to the model deployments and vectors to the search
deployments; it names the hits from catalog metadata held in memory. A model deployment that is not
configured makes its route answer 503 with ``{"error": "... not configured ..."}``.

No ``from __future__ import annotations`` here: FastAPI reads these annotations as real types.
"""

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any, Generic, TypeVar
from urllib.parse import quote

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from visuray.config import StrictModel
from visuray.images import ImageDecodeError, decode_image, resize_max_side
from visuray.serving.args import ServeAppArgs
from visuray.serving.catalog_items import CatalogItems
from visuray.serving.metrics import ServeMetrics
from visuray.serving.schemas import (
    AttributeScore,
    AttributesResponse,
    ClientError,
    ComposedQuery,
    ComposedQueryForm,
    ComposedSearchResponse,
    EmbedResponse,
    ErrorResponse,
    HealthResponse,
    ImageQuery,
    ImageQueryForm,
    ItemListResponse,
    ItemResponse,
    ModelsResponse,
    SearchHit,
    SearchResponse,
    image_media_type,
    parse_k,
    parse_text,
    read_query,
    request_body_openapi,
)
from visuray.serving.security import ApiKeyGuard, guard_from
from visuray.storage import StorageOptions

log = logging.getLogger(__name__)


class RouterSettings(StrictModel):
    """The part of :class:`ServeAppArgs` the router uses (see there for why each default is what it is).

    Kept apart so that swapping an index (a ``user_config`` change of Search) leaves the router as it is.
    """

    max_k: int
    default_k: int
    max_image_bytes: int
    max_image_pixels: int
    max_text_chars: int
    query_max_side: int
    image_cache_shards: int
    models_cache_ttl_s: float
    api_keys_file: str | None
    api_keys_env: str
    storage: StorageOptions

    @classmethod
    def from_args(cls, args: ServeAppArgs) -> "RouterSettings":
        return cls(**{name: getattr(args, name) for name in cls.model_fields})


def _error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorResponse} for status in statuses}


QUERY_ERRORS = _error_responses(400, 413, 415, 422, 503)
IMAGE_QUERY_BODY = request_body_openapi(ImageQuery, ImageQueryForm)
COMPOSED_QUERY_BODY = request_body_openapi(ComposedQuery, ComposedQueryForm)

api = FastAPI(
    title="Visuray visual search",
    description="Upload a product photo -- optionally with a modification such as 'in red' -- and get the "
    "most similar catalog items, or the photo's attributes. Images are sent as a multipart `image` part, "
    "as base64 JSON (`image_b64`) or as the raw image body.",
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


@api.exception_handler(BackPressureError)
async def _overloaded(request: Request, exc: BackPressureError) -> JSONResponse:
    return JSONResponse(
        {"error": "the service is overloaded (queue full): retry shortly"},
        status_code=503,
        headers={"Retry-After": "1"},
    )


# A replica that died (or is being replaced) under a request: the next try lands on a live one.
REPLICA_GONE = (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError)
REPLICA_RETRIES = 2  # model and search calls are pure: retrying cannot apply a change twice


@api.exception_handler(RayActorError)
@api.exception_handler(ReplicaUnavailableError)
@api.exception_handler(DeploymentUnavailableError)
async def _replica_gone(request: Request, exc: Exception) -> JSONResponse:
    log.warning("answering 503: a replica is unavailable (%s)", type(exc).__name__)
    return JSONResponse(
        {"error": "a model replica became unavailable while answering: retry shortly"},
        status_code=503,
        headers={"Retry-After": "1"},
    )


class GuardAndMeasure:
    """API keys (when configured) before anything is read, then per-request metrics.

    Plain ASGI rather than ``@api.middleware("http")``: Starlette's ``BaseHTTPMiddleware`` runs every
    request's route in a task of its own and passes its response through a memory stream. The time
    recorded runs to the last byte sent; a request that raises is recorded as the 500 the client gets.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope["app"].state
        root, scope_path = scope.get("root_path", ""), scope["path"]
        path = (scope_path[len(root) :] if root and scope_path.startswith(root) else scope_path) or "/"
        started = time.perf_counter()
        guard: ApiKeyGuard | None = getattr(state, "api_key_guard", None)
        denial = guard.denial(path, Headers(scope=scope)) if guard is not None else None
        status = 500

        async def send_noting_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if denial is not None:
                refusal = JSONResponse(
                    {"error": denial}, status_code=401, headers={"WWW-Authenticate": "Bearer"}
                )
                await refusal(scope, receive, send_noting_status)
            else:
                await self.app(scope, receive, send_noting_status)
        finally:
            metrics: ServeMetrics | None = getattr(state, "metrics", None)
            if metrics is not None:
                metrics.record(path, status, time.perf_counter() - started)


api.add_middleware(GuardAndMeasure)


async def call_with_retry(method: Any, *args: Any) -> Any:
    """``await method.remote(*args)``, tried again on another replica when the one it reached died."""
    for attempt in range(REPLICA_RETRIES + 1):
        try:
            return await method.remote(*args)
        except REPLICA_GONE:
            if attempt == REPLICA_RETRIES:
                raise
            await asyncio.sleep(0.1 * (attempt + 1))  # let the handle learn that the replica is gone
    raise AssertionError("unreachable")


def _not_configured(what: str, args_key: str) -> ClientError:
    return ClientError(
        503, f"{what} is not configured on this service (deploy it with `{args_key}` in the app args)"
    )


def _image_url(item_id: str) -> str:
    return f"/v1/items/{quote(item_id, safe='/')}/image"


def _web_page() -> str:
    return resources.files("visuray").joinpath("web/index.html").read_text(encoding="utf-8")


T = TypeVar("T")


class SharedRefresh(Generic[T]):
    """A value loaded by ``load()`` and reused for ``ttl_s`` seconds (0: reloaded on every ``get``).

    Callers that arrive while a load is under way await that same load instead of starting their own, so
    a burst of requests after expiry costs one round of calls to the deployments, not one per request.
    A failed load is not kept: its callers get the error and the next ``get`` tries again.
    """

    def __init__(
        self, load: Callable[[], Awaitable[T]], ttl_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._load = load
        self._ttl_s = ttl_s
        self._clock = clock
        self._value: T | None = None
        self._fresh_until = -math.inf
        self._pending: asyncio.Future[T] | None = None
        self._generation = 0  # bumped by invalidate(): a load begun before it must not be kept as fresh

    async def get(self) -> T:
        if self._value is not None and self._clock() < self._fresh_until:
            return self._value
        if self._pending is None:
            self._pending = asyncio.ensure_future(self._refresh(self._generation))
        # Shielded: a caller that goes away (client disconnect) must not cancel the load others await.
        return await asyncio.shield(self._pending)

    def peek(self) -> T | None:
        """The value held now, fresh or not, without loading (None when there is none)."""
        return self._value

    def invalidate(self) -> None:
        """Drop the value; a load under way may predate the change, so later callers start a new one."""
        self._generation += 1
        self._value, self._fresh_until, self._pending = None, -math.inf, None

    async def _refresh(self, generation: int) -> T:
        try:
            value = await self._load()
        finally:
            if generation == self._generation:
                self._pending = None
        if generation == self._generation:
            self._value, self._fresh_until = value, self._clock() + self._ttl_s
        return value


def shows_index_version(models: ModelsResponse, deployment: str, version: str) -> bool:
    """Whether a /v1/models answer names ``version`` as the index of ``deployment`` ("search" answers
    /v1/search, "composed_search" /v1/search/composed)."""
    if deployment == "search":
        return models.index.get("version") == version
    return models.fusion is not None and models.fusion["index"].get("version") == version


@serve.deployment(name="Router")
@serve.ingress(api)
class Router:
    """HTTP ingress: validates input, calls the model and search deployments, names the hits."""

    def __init__(
        self,
        settings: RouterSettings,
        catalog_uri: str,
        embedder: DeploymentHandle,
        search: DeploymentHandle,
        fusion: DeploymentHandle | None,
        composed_search: DeploymentHandle | None,
        attributes: DeploymentHandle | None,
    ) -> None:
        self.settings = settings
        self.embedder = embedder
        self.search = search
        self.fusion = fusion
        self.composed_search = composed_search
        self.attributes = attributes
        self.items = CatalogItems.load(catalog_uri, settings.storage, settings.image_cache_shards)
        self.page = _web_page()
        self._versions: dict[str, str] = {}  # model versions are fixed for a replica's lifetime
        # Index versions are not (Search swaps them): see ServeAppArgs.models_cache_ttl_s for the bound.
        self._models = SharedRefresh(self._load_models, settings.models_cache_ttl_s)
        # The FastAPI app is this replica's own (one Router per replica process): its middleware reads these.
        api.state.api_key_guard = guard_from(settings.api_keys_file, settings.api_keys_env)
        api.state.metrics = ServeMetrics()
        api.state.metrics.set_versions({"catalog": self.items.version})
        if api.state.api_key_guard.enabled:
            log.info("API keys required (%d configured)", len(api.state.api_key_guard.keys))

    async def _version_of(self, name: str, handle: DeploymentHandle) -> str:
        if name not in self._versions:
            self._versions[name] = (await call_with_retry(handle.info))["version"]
            api.state.metrics.set_versions({name: self._versions[name]})
        return self._versions[name]

    def _answered_from(self, deployment: str, index_version: str) -> None:
        """A search answer names its index: one the cached /v1/models does not show means it was swapped."""
        cached = self._models.peek()
        if cached is not None and not shows_index_version(cached, deployment, index_version):
            self._models.invalidate()

    async def _load_models(self) -> ModelsResponse:
        handles = [self.embedder, self.search, self.fusion, self.composed_search, self.attributes]
        # Each asked like every other route asks: again on another replica if the one reached died.
        answers = iter(await asyncio.gather(*(call_with_retry(h.info) for h in handles if h is not None)))
        model, index = next(answers), next(answers)
        fusion = composed = attributes = None
        if self.fusion is not None:
            fusion, composed = next(answers), next(answers)
        if self.attributes is not None:
            attributes = next(answers)
        return ModelsResponse(
            model=model,
            index=index,
            fusion=None if fusion is None else {**fusion, "index": composed},
            attributes=attributes,
            catalog={"version": self.items.version, "count": len(self.items)},
        )

    # ------------------------------------------------------------------ input
    async def _query(self, request: Request, fields: tuple[str, ...] = ("k",)) -> Any:
        return await read_query(request, self.settings.max_image_bytes, fields)

    async def _pixels(self, data: bytes) -> np.ndarray:
        """Decode (refusing bombs and broken files) and downscale to what the models can use."""

        def decode() -> np.ndarray:
            image = decode_image(data, self.settings.max_image_pixels)
            return np.asarray(resize_max_side(image, self.settings.query_max_side))

        try:
            return await asyncio.to_thread(decode)
        except ImageDecodeError as exc:
            raise ClientError(400, str(exc)) from None

    def _hits(self, found: dict[str, Any]) -> list[SearchHit]:
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
                    image_url=_image_url(item_id),
                )
            )
        return hits

    def _item(self, meta: dict[str, Any]) -> ItemResponse:
        return ItemResponse(**meta, image_url=_image_url(meta["item_id"]))

    # ------------------------------------------------------------------ routes
    @api.get("/", include_in_schema=False)
    async def page(self) -> HTMLResponse:
        return HTMLResponse(self.page)

    @api.get("/healthz")
    async def healthz(self) -> HealthResponse:
        return HealthResponse(status="ok")

    @api.get("/v1/models")
    async def models(self) -> ModelsResponse:
        """Which model (ensemble), index, fusion and attribute versions answer, and the catalog (cached
        for ``models_cache_ttl_s`` seconds per router replica)."""
        return await self._models.get()

    @api.post("/v1/embed", openapi_extra=IMAGE_QUERY_BODY, responses=QUERY_ERRORS)
    async def embed(self, request: Request) -> EmbedResponse:
        """The query image's ensemble embedding (unit vector)."""
        query = await self._query(request, fields=())
        vector = await call_with_retry(self.embedder.embed, await self._pixels(query.image))
        version = await self._version_of("embedder", self.embedder)
        return EmbedResponse(model_version=version, dim=len(vector), embedding=vector)

    @api.post("/v1/search", openapi_extra=IMAGE_QUERY_BODY, responses=QUERY_ERRORS)
    async def search_items(self, request: Request) -> SearchResponse:
        """The k catalog items most similar to the query image, best first."""
        query = await self._query(request)
        k = parse_k(query.k, self.settings.default_k, self.settings.max_k)
        vector = await call_with_retry(self.embedder.embed, await self._pixels(query.image))
        found = await call_with_retry(self.search.search, vector, k)
        api.state.metrics.set_versions({"index": found["index_version"]})
        self._answered_from("search", found["index_version"])
        version = await self._version_of("embedder", self.embedder)
        return SearchResponse(
            model_version=version, index_version=found["index_version"], k=k, results=self._hits(found)
        )

    @api.post("/v1/search/composed", openapi_extra=COMPOSED_QUERY_BODY, responses=QUERY_ERRORS)
    async def search_composed(self, request: Request) -> ComposedSearchResponse:
        """The k catalog items that look like the reference image changed as the text says."""
        if self.fusion is None or self.composed_search is None:
            raise _not_configured("composed search", "fusion")
        query = await self._query(request, fields=("k", "text"))
        k = parse_k(query.k, self.settings.default_k, self.settings.max_k)
        text = parse_text(query.text, self.settings.max_text_chars)
        vector = await call_with_retry(self.fusion.encode, await self._pixels(query.image), text)
        found = await call_with_retry(self.composed_search.search, vector, k)
        self._answered_from("composed_search", found["index_version"])
        return ComposedSearchResponse(
            model_version=await self._version_of("fusion", self.fusion),
            index_version=found["index_version"],
            k=k,
            text=text,
            results=self._hits(found),
        )

    @api.post("/v1/attributes", openapi_extra=IMAGE_QUERY_BODY, responses=QUERY_ERRORS)
    async def predict_attributes(self, request: Request) -> AttributesResponse:
        """Labels whose score reaches their own threshold, and every label's score."""
        if self.attributes is None:
            raise _not_configured("attribute prediction", "attributes")
        query = await self._query(request, fields=())
        predicted = await call_with_retry(self.attributes.predict, await self._pixels(query.image))
        return AttributesResponse(
            model_version=await self._version_of("attributes", self.attributes),
            labels=[AttributeScore(**p) for p in predicted["labels"]],
            scores=predicted["scores"],
        )

    @api.get("/v1/items", responses=_error_responses(422))
    async def list_items(
        self,
        limit: int = Query(12, ge=1, le=100, description="items per page"),
        offset: int = Query(0, ge=0, description="items to skip (in item id order)"),
    ) -> ItemListResponse:
        """A page of catalog items (the web page shows a few to pick a query from)."""
        return ItemListResponse(
            count=len(self.items), items=[self._item(m) for m in self.items.sample(limit, offset)]
        )

    # Registered before /v1/items/{item_id:path}: ids may contain "/" (folder-ingested catalogs).
    @api.get(
        "/v1/items/{item_id:path}/image",
        response_class=Response,
        responses={200: {"content": {"image/*": {}}}, **_error_responses(404)},
    )
    async def item_image(self, item_id: str) -> Response:
        """The item's image as ingested."""
        if item_id not in self.items:
            raise ClientError(404, f"unknown item id {item_id!r}")
        data = await asyncio.to_thread(self.items.image, item_id)
        return Response(content=data, media_type=image_media_type(data))

    @api.get("/v1/items/{item_id:path}", responses=_error_responses(404))
    async def item(self, item_id: str) -> ItemResponse:
        """The item's catalog metadata."""
        meta = self.items.get(item_id)
        if meta is None:
            raise ClientError(404, f"unknown item id {item_id!r}")
        return self._item(meta)
