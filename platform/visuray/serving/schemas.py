"""What crosses the HTTP boundary: request and response models, and the parsing of untrusted input.

Every way a client can get a request wrong (not an image, a truncated file, too many pixels, a payload
above the limit, empty or overlong text, a bad ``k``, an unknown field) ends here as a
:class:`ClientError` -- a 4xx with ``{"error": ...}`` that says what to fix -- never as a 500.
Queries arrive as multipart forms (an ``image`` part), base64 JSON (``{"image_b64": ...}``) or raw image
bytes; the body is read with a size limit before anything is parsed.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field

if TYPE_CHECKING:
    from starlette.requests import Request

# Multipart boundaries and headers add a little to an upload; base64 adds a third.
ENVELOPE_BYTES = 64 * 1024
IMAGE_PART_NAMES = ("image", "file")


class ClientError(Exception):
    """A request the client must fix; the router answers ``status`` with ``{"error": message}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# ------------------------------------------------------------------------------- request models
# Documentation of the accepted bodies (OpenAPI); the router parses them itself, with size limits.
class ImageQuery(BaseModel):
    """JSON form of an image query."""

    image_b64: str = Field(
        description="the image file (JPEG, PNG, WebP...) as base64; a data: URL is accepted"
    )
    k: int | None = Field(None, description="number of results (1..max_k); omitted: the default k")


class ComposedQuery(ImageQuery):
    """JSON form of a composed query: a reference image and how the wanted item differs from it."""

    text: str = Field(description='the modification, e.g. "same, but with short sleeves"')


class ImageQueryForm(BaseModel):
    image: bytes = Field(json_schema_extra={"format": "binary"}, description="the image file")
    k: int | None = None


class ComposedQueryForm(ImageQueryForm):
    text: str


def request_body_openapi(json_model: type[BaseModel], form_model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` declaring the JSON, multipart and raw-image bodies a query route accepts."""

    def inline(model: type[BaseModel]) -> dict[str, Any]:
        schema = model.model_json_schema()
        schema.pop("title", None)
        for prop in schema.get("properties", {}).values():
            if prop.get("format") == "binary" or prop.get("contentMediaType"):
                prop.clear()
                prop.update({"type": "string", "format": "binary"})
        return schema

    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {"schema": inline(form_model)},
                "application/json": {"schema": inline(json_model)},
                "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
            },
        }
    }


# ------------------------------------------------------------------------------ response models
class ErrorResponse(BaseModel):
    error: str = Field(description="what is wrong with the request, or why the service cannot answer")


class SearchHit(BaseModel):
    item_id: str
    score: float
    label: str | None = None
    title: str | None = None
    category: str | None = None
    image_url: str


class SearchResponse(BaseModel):
    model_version: str = Field(description="version of the model (or ensemble) that embedded the query")
    index_version: str = Field(description="version of the index that answered")
    k: int
    results: list[SearchHit]


class ComposedSearchResponse(SearchResponse):
    text: str


class EmbedResponse(BaseModel):
    model_version: str
    dim: int
    embedding: list[float]


class AttributeScore(BaseModel):
    label: str
    score: float
    threshold: float


class AttributesResponse(BaseModel):
    model_version: str
    labels: list[AttributeScore] = Field(description="labels whose score reaches their threshold, best first")
    scores: dict[str, float] = Field(description="every label's score")


class ItemResponse(BaseModel):
    item_id: str
    label: str | None = None
    category: str | None = None
    title: str | None = None
    description: str | None = None
    attributes: dict[str, Any] = Field(default_factory=dict)
    image_url: str


class ItemListResponse(BaseModel):
    count: int = Field(description="items in the catalog")
    items: list[ItemResponse]


class HealthResponse(BaseModel):
    status: str


class ModelsResponse(BaseModel):
    model: dict[str, Any] = Field(description="the embedding ensemble: version, dimension, members")
    index: dict[str, Any] = Field(description="the index answering /v1/search: version, model version, count")
    fusion: dict[str, Any] | None = Field(
        None, description="the composed-retrieval model and index, if served"
    )
    attributes: dict[str, Any] | None = Field(None, description="the attribute model, if served")
    catalog: dict[str, Any]


# ---------------------------------------------------------------------------------- parsing
@dataclass
class Query:
    """A parsed query: the encoded image and the raw (not yet validated) ``k`` and ``text``."""

    image: bytes
    k: Any = None
    text: Any = None


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
    except (TypeError, ValueError, OverflowError):
        raise ClientError(400, f"k must be an integer between 1 and {max_k}, got {value!r}") from None
    if not 1 <= k <= max_k:
        raise ClientError(400, f"k must be between 1 and {max_k}, got {k}")
    return k


def parse_text(value: Any, max_chars: int) -> str:
    """The modification text of a composed query: non-blank and at most ``max_chars`` characters."""
    if value is None:
        raise ClientError(400, "a composed query needs a 'text' field describing the modification")
    if not isinstance(value, str):
        raise ClientError(400, f"text must be a string, got {type(value).__name__}")
    text = value.strip()
    if not text:
        raise ClientError(400, "text is empty: describe the modification, e.g. 'in red'")
    if len(text) > max_chars:
        raise ClientError(400, f"text is {len(text)} characters long, above the limit of {max_chars}")
    return text


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
    if not data:
        raise ClientError(400, "image_b64 decodes to no bytes")
    if len(data) > max_bytes:
        raise ClientError(413, f"image is larger than the limit of {max_bytes} bytes")
    return data


def parse_json_query(body: bytes, max_bytes: int, fields: tuple[str, ...] = ("k",)) -> Query:
    """``{"image_b64": ..., "k": ..., ...}`` -> :class:`Query`; only ``image_b64`` and ``fields`` are allowed."""
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ClientError(400, f"request body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise ClientError(400, 'request body must be a JSON object like {"image_b64": "...", "k": 10}')
    unknown = sorted(set(payload) - {"image_b64", *fields})
    if unknown:
        raise ClientError(
            400, f"unknown field(s) {unknown}; expected image_b64 and optionally {list(fields)}"
        )
    image = decode_base64_image(payload.get("image_b64"), max_bytes)
    return Query(image=image, k=payload.get("k"), text=payload.get("text"))


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it exceeds ``limit`` -- declared or streamed."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ClientError(413, f"request body of {declared} bytes is above the limit of {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():  # bounded even when no Content-Length was sent
        body += chunk
        if len(body) > limit:
            raise ClientError(413, f"request body is above the limit of {limit} bytes")
    return bytes(body)


async def parse_multipart(request: Request, body: bytes, max_bytes: int) -> Query:
    """:class:`Query` from a multipart form with an ``image`` (or ``file``) part and ``k`` / ``text`` fields."""
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException
    from starlette.formparsers import MultiPartException
    from starlette.requests import Request as StarletteRequest

    delivered = False

    async def replay() -> dict[str, Any]:  # the body was already read (with a size limit) by the caller
        nonlocal delivered
        if delivered:
            return {"type": "http.disconnect"}
        delivered = True
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await StarletteRequest(request.scope, replay).form(max_files=2, max_fields=8)
    except (MultiPartException, HTTPException, ValueError) as exc:
        detail = getattr(exc, "message", None) or getattr(exc, "detail", "") or str(exc)
        raise ClientError(400, f"malformed multipart body: {detail}") from None
    try:
        upload = next((form.get(n) for n in IMAGE_PART_NAMES if isinstance(form.get(n), UploadFile)), None)
        if upload is None:
            raise ClientError(400, "multipart body needs an image file in a part named 'image'")
        data = await upload.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise ClientError(413, f"image is larger than the limit of {max_bytes} bytes")
        fields = {}
        for name in ("k", "text"):
            value = form.get(name)
            if value is not None and not isinstance(value, str):
                raise ClientError(400, f"multipart field {name!r} must be a plain form field, not a file")
            fields[name] = value
        return Query(image=data, **fields)
    finally:
        await form.close()


async def read_query(request: Request, max_bytes: int, json_fields: tuple[str, ...] = ("k",)) -> Query:
    """The query of a request: multipart, JSON ``{"image_b64"}`` or a raw image body (``?k=`` in the URL)."""
    body = await read_body(request, max_bytes * 4 // 3 + ENVELOPE_BYTES)
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        query = await parse_multipart(request, body, max_bytes)
    elif content_type == "application/json":
        query = parse_json_query(body, max_bytes, json_fields)
    elif content_type.startswith("image/") or content_type == "application/octet-stream":
        if len(body) > max_bytes:
            raise ClientError(413, f"image is larger than the limit of {max_bytes} bytes")
        query = Query(image=body)
    else:
        raise ClientError(
            415,
            f"unsupported content type {content_type or '(none)'!r}: send multipart/form-data with an "
            '"image" part, JSON {"image_b64": ...}, or the raw image bytes',
        )
    if not query.image:
        raise ClientError(400, "the image is empty")
    if query.k is None:
        query.k = request.query_params.get("k")
    if query.text is None and "text" in json_fields:
        query.text = request.query_params.get("text")
    return query


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
