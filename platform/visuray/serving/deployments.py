"""The Ray Serve deployments behind the router, and the typed application builder.

Request path (the router is in :mod:`visuray.serving.router`): the router reads, validates and decodes the
upload, then hands the decoded pixels (downscaled to ``query_max_side``) to a model deployment:

- ``EmbeddingEnsemble``: pixels -> the ensemble's unit vector (``@serve.batch``: concurrent queries share
  one forward pass per member, through ``to_model_input``, the index job's preprocessing);
- ``Fusion``: pixels + modifying text -> a query vector in the fusion model's target space;
- ``Attributes``: pixels -> labels with scores and thresholds;
- ``Search`` (and ``ComposedSearch``, the same class over the composed index): a query vector -> item ids
  and scores (batched FAISS search).

Only query pixels, query vectors, ids and scores cross deployment handles; catalog images stay in storage.
Every model and index loads in a replica's constructor or ``reconfigure``, never at import. No
``from __future__ import annotations`` here: Serve's app builder reads these annotations as real types.
"""

import asyncio
import contextlib
import logging
import time
from collections import Counter
from typing import Any

import numpy as np
from ray import serve
from ray.serve import Application

from visuray.index.ensemble import EnsembleSpec
from visuray.serving.args import (
    BatchSettings,
    IncompatibleIndexError,
    ServeAppArgs,
    check_index_matches_model,
)
from visuray.storage import StorageOptions, absolute_uri

log = logging.getLogger(__name__)


def _threads_for(num_cpus: float) -> int:
    return max(1, int(num_cpus))


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class BatchSizes:
    """How many batches of each size a replica's ``@serve.batch`` method has run: whether concurrent
    requests really share forward passes (every batched deployment answers ``batching()`` with it)."""

    def __init__(self, batch: BatchSettings) -> None:
        self.settings = batch
        self.counts: Counter[int] = Counter()

    def record(self, size: int) -> None:
        self.counts[size] += 1

    def summary(self) -> dict[str, Any]:
        return {
            **self.settings.model_dump(),
            "batches": sum(self.counts.values()),
            "requests": sum(size * n for size, n in self.counts.items()),
            "sizes": {str(size): n for size, n in sorted(self.counts.items())},
        }


class ReportsBatching:
    """A deployment with a ``@serve.batch`` method: ``batching()`` answers its :class:`BatchSizes`."""

    batch_sizes: BatchSizes

    def batching(self) -> dict[str, Any]:
        return self.batch_sizes.summary()


def _set_batching(method: Any, batch: BatchSettings) -> BatchSizes:
    method.set_max_batch_size(batch.max_batch_size)
    method.set_batch_wait_timeout_s(batch.batch_wait_timeout_s)
    return BatchSizes(batch)


def _images(pixels: list[np.ndarray]) -> list[Any]:
    from PIL import Image

    return [Image.fromarray(np.asarray(p, dtype=np.uint8)) for p in pixels]


# ---------------------------------------------------------------------------- EmbeddingEnsemble
@serve.deployment(name="EmbeddingEnsemble")
class EmbeddingEnsembleDeployment(ReportsBatching):
    """The embedding ensemble; ``embed(pixels)`` -> one unit ensemble vector as a list of floats."""

    def __init__(
        self,
        ensemble: EnsembleSpec,
        storage: StorageOptions,
        expected_version: str,
        batch: BatchSettings,
        num_threads: int,
    ) -> None:
        import torch

        from visuray.index.ensemble import EmbeddingEnsemble

        torch.set_num_threads(num_threads)
        self.device = _device()
        self.ensemble = EmbeddingEnsemble.load(ensemble, storage, device=self.device)
        if self.ensemble.version != expected_version:
            raise ValueError(f"the ensemble loaded as {self.ensemble.version}, expected {expected_version}")
        self.info_dict = {**self.ensemble.resolved.describe(), "device": self.device}
        self.batch_sizes = _set_batching(self.embed, batch)
        log.info("ensemble ready: %s (dim %d) on %s", self.ensemble.version, self.ensemble.dim, self.device)

    def info(self) -> dict[str, Any]:
        return self.info_dict

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def embed(self, pixels: list[np.ndarray]) -> list[list[float]]:
        self.batch_sizes.record(len(pixels))
        # The forward pass runs off the event loop so the replica keeps answering health checks.
        vectors = await asyncio.to_thread(self.ensemble.embed, _images(pixels))
        return vectors.tolist()


# ---------------------------------------------------------------------------------------- Fusion
@serve.deployment(name="Fusion")
class FusionDeployment(ReportsBatching):
    """Composed retrieval; ``encode(pixels, text)`` -> one query vector in the fusion target space."""

    def __init__(
        self,
        model_uri: str,
        loader: str,
        storage: StorageOptions,
        expected_version: str,
        expected_dim: int,
        batch: BatchSettings,
        num_threads: int,
    ) -> None:
        import torch

        from visuray.predictors import FusionModel, load_checked

        torch.set_num_threads(num_threads)
        self.device = _device()
        self.model = load_checked(loader, model_uri, storage, self.device, FusionModel)
        # The composed index must hold targets embedded by this very model.
        check_index_matches_model(
            {"model_version": expected_version, "dim": expected_dim},
            {"model_version": self.model.version, "embedding_dim": self.model.dim},
        )
        self.info_dict = {"version": self.model.version, "uri": model_uri, "dim": self.model.dim}
        self.batch_sizes = _set_batching(self.encode, batch)
        log.info("fusion ready: %s on %s", self.model.version, self.device)

    def info(self) -> dict[str, Any]:
        return self.info_dict

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def encode(self, pixels: list[np.ndarray], texts: list[str]) -> list[list[float]]:
        self.batch_sizes.record(len(pixels))
        vectors = await asyncio.to_thread(self.model.encode_queries, _images(pixels), texts)
        return np.asarray(vectors, dtype=np.float32).tolist()


# ------------------------------------------------------------------------------------ Attributes
@serve.deployment(name="Attributes")
class AttributesDeployment(ReportsBatching):
    """Attributes; ``predict(pixels)`` -> ``{"labels": [{label, score, threshold}], "scores": {...}}``."""

    def __init__(
        self, model_uri: str, loader: str, storage: StorageOptions, batch: BatchSettings, num_threads: int
    ) -> None:
        import torch

        from visuray.predictors import AttributeModel, load_checked

        torch.set_num_threads(num_threads)
        self.device = _device()
        self.model = load_checked(loader, model_uri, storage, self.device, AttributeModel)
        self.thresholds = {label: float(t) for label, t in self.model.thresholds.items()}
        self.info_dict = {"version": self.model.version, "uri": model_uri, "labels": sorted(self.thresholds)}
        self.batch_sizes = _set_batching(self.predict, batch)
        log.info("attributes ready: %s, %d labels", self.model.version, len(self.thresholds))

    def info(self) -> dict[str, Any]:
        return self.info_dict

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def predict(self, pixels: list[np.ndarray]) -> list[dict[str, Any]]:
        self.batch_sizes.record(len(pixels))
        predictions = await asyncio.to_thread(self.model.predict, _images(pixels))
        return [self._decide(scores) for scores in predictions]

    def _decide(self, scores: dict[str, float]) -> dict[str, Any]:
        """Each label against its own threshold (chosen on validation data when the model was trained)."""
        positives = [
            {"label": label, "score": float(score), "threshold": self.thresholds[label]}
            for label, score in scores.items()
            if score >= self.thresholds[label]
        ]
        positives.sort(key=lambda p: -p["score"])
        return {"labels": positives, "scores": {k: float(v) for k, v in scores.items()}}


# ---------------------------------------------------------------------------------------- Search
@serve.deployment(name="Search")
class Search(ReportsBatching):
    """A FAISS index; ``search(vector, k)`` -> ``{"ids", "scores", "index_version"}``, best first.

    The index comes from ``user_config`` (``{"index": URI, "reload_interval_s": seconds or None}``), so a
    new index version is swapped in by ``reconfigure`` -- a lightweight Serve update of the running
    replicas -- or, with ``reload_interval_s``, by following the index root's LATEST. Either way the new
    index is loaded and checked beside the old one and replaces it in one assignment: requests in flight
    finish on the old index, later ones use the new, none is dropped. An index of another model version
    or dimension is refused: the replica keeps serving the old one and reports the refusal in ``info``.
    """

    def __init__(
        self,
        storage: StorageOptions,
        model_version: str,
        embedding_dim: int,
        batch: BatchSettings,
        num_threads: int,
    ) -> None:
        import faiss

        faiss.omp_set_num_threads(num_threads)
        self.storage = storage
        self.expected = {"model_version": model_version, "embedding_dim": embedding_dim}
        self.index: Any = None  # visuray.index.faiss_index.SearchIndex once configured
        self.source: str | None = None
        self.reload_interval_s: float | None = None
        self.reload_error: str | None = None
        self._refused: str | None = None  # the last version URI refused: not retried every interval
        self._watcher: asyncio.Task | None = None
        self._swap_lock = asyncio.Lock()
        self.batch_sizes = _set_batching(self.search, batch)

    # ------------------------------------------------------------------ index lifecycle
    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve calls this at start and on every ``user_config`` change (no replica restart)."""
        source = absolute_uri(str(user_config["index"]))
        self.reload_interval_s = user_config.get("reload_interval_s")
        first = self.index is None
        if first or source != self.source:
            swapped = await self._swap_to(source)
            if first and not swapped:  # nothing to fall back to: a replica without an index must not start
                raise IncompatibleIndexError(self.reload_error)
            self.source = source if swapped else self.source
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None
        if self.reload_interval_s:
            self._watcher = asyncio.get_running_loop().create_task(self._follow_latest())

    async def _swap_to(self, uri: str) -> bool:
        """Load ``uri`` beside the current index and swap it in if it fits the served model."""
        from visuray.index.faiss_index import SearchIndex

        async with self._swap_lock:
            started = time.monotonic()
            try:
                loaded = await asyncio.to_thread(SearchIndex.load, uri, self.storage)
                check_index_matches_model(
                    {"model_version": loaded.model_version, "dim": loaded.dim}, self.expected
                )
            except Exception as exc:  # keep serving the old index; say why the new one was refused
                self.reload_error = f"{uri}: {exc}"
                self._refused = uri
                log.error("index %s refused, still serving %s: %s", uri, self._version(), exc)
                return False
            if self.index is not None and loaded.version == self.index.version:
                return True
            old = self._version()
            self.index = loaded  # one assignment: in-flight searches keep their reference to the old index
            self.reload_error = None
            log.info(
                "index %s (%d items) loaded in %.1fs, replacing %s",
                loaded.version,
                len(loaded),
                time.monotonic() - started,
                old,
            )
            return True

    async def _follow_latest(self) -> None:
        from visuray.storage import resolve_artifact

        while True:
            await asyncio.sleep(self.reload_interval_s or 60)
            with contextlib.suppress(Exception):  # storage hiccups: try again next interval
                latest = await asyncio.to_thread(resolve_artifact, self.source, self.storage)
                current = self._version()
                if latest.manifest.version != current and latest.uri != self._refused:
                    await self._swap_to(latest.uri)

    def _version(self) -> str | None:
        return None if self.index is None else self.index.version

    def info(self) -> dict[str, Any]:
        index = self.index
        return {
            "version": index.version,
            "uri": index.artifact.uri,
            "source": self.source,
            "model_version": index.model_version,
            "count": len(index),
            "dim": index.dim,
            "metric": index.metric,
            "factory": index.factory,
            "shards": index.num_shards,
            "reload_interval_s": self.reload_interval_s,
            "reload_error": self.reload_error,
        }

    # ------------------------------------------------------------------ queries
    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def search(self, vectors: list[list[float]], ks: list[int]) -> list[dict[str, Any]]:
        self.batch_sizes.record(len(vectors))
        return await asyncio.to_thread(self._search_now, self.index, vectors, ks)

    @staticmethod
    def _search_now(index: Any, vectors: list[list[float]], ks: list[int]) -> list[dict[str, Any]]:
        ids, scores = index.search(np.asarray(vectors, dtype=np.float32), max(ks))
        return [
            {
                "ids": row_ids[:k],
                "scores": [float(s) for s in row_scores[: min(k, len(row_ids))]],
                "index_version": index.version,
            }
            for row_ids, row_scores, k in zip(ids, scores, ks, strict=True)
        ]


# -------------------------------------------------------------------------------------- builder
def _index_user_config(index: Any, follow: bool, interval: float | None) -> dict[str, Any]:
    # Following LATEST needs the root; otherwise the version resolved now is pinned.
    return {"index": index.root if follow else index.uri, "reload_interval_s": interval}


def build_app(args: ServeAppArgs) -> Application:
    """The Serve application for ``args``: models, indexes and catalog resolved to their current versions.

    Raises :class:`visuray.serving.IncompatibleIndexError` before deploying anything when an index was
    built with another model or ensemble (version or dimension). Reads only manifests: no model loads.
    """
    from visuray.index.ensemble import resolve_ensemble
    from visuray.serving.router import Router, RouterSettings
    from visuray.storage import ArtifactError, resolve_artifact

    if isinstance(args, dict):  # a plain dict from Python callers; Serve's config path validates itself
        args = ServeAppArgs.model_validate(args)
    ensemble = resolve_ensemble(args.embedding_ensemble(), args.storage)
    index = _resolve_index(args.index, args.storage)
    model_meta = {"model_version": ensemble.version, "embedding_dim": ensemble.dim}
    check_index_matches_model(index.manifest.metadata, model_meta)
    catalog_uri = args.catalog or index.manifest.metadata.get("catalog_uri")
    if not catalog_uri:
        raise ValueError("no catalog given and the index does not record the catalog it was built from")
    catalog = resolve_artifact(absolute_uri(catalog_uri), args.storage)
    if catalog.manifest.kind != "catalog":
        raise ArtifactError(f"{catalog_uri} is a {catalog.manifest.kind!r} artifact, not a catalog")
    _warn_if_stale(index, catalog)

    follow = args.index_reload_interval_s is not None
    interval = args.index_reload_interval_s
    embedder = EmbeddingEnsembleDeployment.options(**args.embedder.to_serve()).bind(
        ensemble.pinned_spec(),
        args.storage,
        ensemble.version,
        args.embed_batch,
        _threads_for(args.embedder.num_cpus),
    )
    search = Search.options(
        **args.search.to_serve(), user_config=_index_user_config(index, follow, interval)
    ).bind(
        args.storage, ensemble.version, ensemble.dim, args.search_batch, _threads_for(args.search.num_cpus)
    )

    fusion = composed_search = None
    if args.fusion is not None:
        composed_index = _resolve_index(args.fusion.index, args.storage) if args.fusion.index else index
        meta = composed_index.manifest.metadata
        fusion = FusionDeployment.options(**args.fusion.deployment.to_serve()).bind(
            absolute_uri(args.fusion.model),
            args.fusion.loader,
            args.storage,
            meta["model_version"],
            int(meta["dim"]),
            args.fusion.batch,
            _threads_for(args.fusion.deployment.num_cpus),
        )
        composed_search = Search.options(
            name="ComposedSearch",
            **args.search.to_serve(),
            user_config=_index_user_config(composed_index, follow, interval),
        ).bind(args.storage, meta["model_version"], int(meta["dim"]), args.search_batch, 1)

    attributes = None
    if args.attributes is not None:
        attributes = AttributesDeployment.options(**args.attributes.deployment.to_serve()).bind(
            absolute_uri(args.attributes.model),
            args.attributes.loader,
            args.storage,
            args.attributes.batch,
            _threads_for(args.attributes.deployment.num_cpus),
        )
    return Router.options(**args.router.to_serve()).bind(
        RouterSettings.from_args(args),
        catalog.uri,
        embedder,
        search,
        fusion,
        composed_search,
        attributes,
    )


def _resolve_index(uri: str, storage: StorageOptions) -> Any:
    from visuray.storage import ArtifactError, resolve_artifact

    index = resolve_artifact(absolute_uri(uri), storage)
    if index.manifest.kind != "index":
        raise ArtifactError(f"{uri} is a {index.manifest.kind!r} artifact, not an index")
    return index


def _warn_if_stale(index: Any, catalog: Any) -> None:
    built_from = index.manifest.metadata.get("catalog_version")
    if built_from and built_from != catalog.manifest.version:
        log.warning(
            "index %s was built from catalog version %s but catalog %s is served: items added since "
            "are not searchable, removed ones have no metadata",
            index.manifest.version,
            built_from,
            catalog.manifest.version,
        )
