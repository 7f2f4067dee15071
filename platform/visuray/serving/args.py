"""The Serve application's typed arguments (``ServeAppArgs``: what ``serve/config.yaml``'s ``args`` and
``visuray serve`` validate) and the check that an index was built with the model being served. Light: no
torch, faiss or Ray at import, because the CLI and the job specs import it."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from pydantic import Field, model_validator

from visuray.config import StrictModel
from visuray.images import DEFAULT_MAX_PIXELS
from visuray.index.ensemble import EnsembleSpec, ensemble_spec
from visuray.storage import StorageOptions

MiB = 1 << 20
# The Ray resources a deployment reserves per replica, and the DeploymentSettings field that sets each.
RESOURCE_SETTINGS = {"CPU": "num_cpus", "GPU": "num_gpus"}


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

    @property
    def first_replicas(self) -> int:
        """Replicas Serve starts the deployment with (autoscaling: its minimum)."""
        return self.autoscaling.min_replicas if self.autoscaling is not None else self.num_replicas

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


FUSION_LOADER = "visuray.predictors:load_fusion_model"
ATTRIBUTES_LOADER = "visuray.predictors:load_attribute_model"


class FusionArgs(StrictModel):
    """The composed-retrieval deployment: reference image + modifying text -> query vector -> search."""

    model: str = Field(description="fusion model checkpoint URI (root or version folder)")
    index: str | None = Field(
        None,
        description="index of the catalog embedded in the fusion model's target space; None: the main "
        "index, which then must have been built in that space (the versions are checked)",
    )
    loader: str = Field(
        FUSION_LOADER,
        description="import path of `loader(uri, storage) -> FusionModel` (visuray.predictors); "
        "another implementation of the interface can be plugged in here",
    )
    batch: BatchSettings = Field(default_factory=BatchSettings)
    deployment: DeploymentSettings = Field(default_factory=DeploymentSettings)


class AttributesArgs(StrictModel):
    """The attribute deployment: image -> labels whose score reaches their threshold."""

    model: str = Field(description="attribute model checkpoint URI (root or version folder)")
    loader: str = Field(
        ATTRIBUTES_LOADER, description="import path of `loader(uri, storage) -> AttributeModel`"
    )
    batch: BatchSettings = Field(default_factory=BatchSettings)
    deployment: DeploymentSettings = Field(default_factory=DeploymentSettings)


class ServeAppArgs(StrictModel):
    """Arguments of the Serve application (``args:`` in serve/config.yaml, or built in Python)."""

    model: str | None = Field(
        None, description="embedding model checkpoint URI (root or version folder); or set `ensemble`"
    )
    ensemble: EnsembleSpec | None = Field(
        None, description="several embedding checkpoints combined by weight (one member is valid too)"
    )
    index: str = Field(description="index URI built with that model or ensemble (root or version folder)")
    catalog: str | None = Field(
        None,
        description="catalog URI for item metadata and images; None: the catalog the index was built from",
    )
    fusion: FusionArgs | None = None  # None: /v1/search/composed answers 503 "not configured"
    attributes: AttributesArgs | None = None  # None: /v1/attributes answers 503 "not configured"
    storage: StorageOptions = Field(default_factory=StorageOptions)  # how to reach s3:// URIs
    index_reload_interval_s: float | None = Field(
        None,
        gt=0,
        description="None: serve the index version resolved at deploy. A number: Search replicas check "
        "the index root's LATEST this often and swap in a newly published compatible version without "
        "dropping requests (the Search deployment's user_config swaps explicitly either way)",
    )

    max_k: int = Field(100, ge=1, description="largest k a client may ask for; bounds the work per query")
    default_k: int = Field(10, ge=1, description="k when the request does not say")
    max_image_bytes: int = Field(10 * MiB, ge=1024, description="10 MiB fits any phone photo")
    max_image_pixels: int = Field(
        DEFAULT_MAX_PIXELS, ge=1, description="decompression-bomb guard: 40 MP accepts camera photos"
    )
    max_text_chars: int = Field(
        512, ge=1, description="a modification is a phrase; 512 characters bounds the text model's work"
    )
    query_max_side: int = Field(
        512,
        ge=32,
        description="the router downscales query photos to this long side before handing pixels to the "
        "models: at most 0.8 MB per query crosses the cluster, still twice any ViT input size",
    )
    image_cache_shards: int = Field(
        4, ge=1, description="catalog shards whose images the router keeps for /v1/items/{id}/image"
    )
    models_cache_ttl_s: float = Field(
        5.0,
        ge=0,
        description="each router replica keeps its /v1/models answer this long instead of asking every "
        "deployment's info() per request (0: ask every time). Staleness bound: a search answer from an "
        "index version the cached answer does not show drops it at once; an index swap that no search "
        "through this replica has seen yet (a Search user_config change or a followed LATEST) shows "
        "within this many seconds of the Search replicas loading it",
    )
    api_keys_file: str | None = Field(
        None,
        description="file of API keys, one per line (a mounted Kubernetes secret), read by each router "
        "replica; with keys (from here or api_keys_env) every route but /healthz needs X-API-Key. None and "
        "an empty environment variable: the service is open, for a private network",
    )
    api_keys_env: str = Field(
        "VISURAY_API_KEYS",
        description="environment variable of the router replicas holding comma-separated API keys (a "
        "secret exposed as env); unset or empty adds none",
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

    @model_validator(mode="after")
    def _one_embedder(self) -> ServeAppArgs:
        ensemble_spec(self.model, self.ensemble, "serve app args")
        return self

    def embedding_ensemble(self) -> EnsembleSpec:
        return ensemble_spec(self.model, self.ensemble, "serve app args")

    def deployment_settings(self) -> dict[str, DeploymentSettings]:
        """Every deployment this application runs, by Serve name, with the settings it is deployed with."""
        found = {"Router": self.router, "EmbeddingEnsemble": self.embedder, "Search": self.search}
        if self.fusion is not None:
            found |= {"Fusion": self.fusion.deployment, "ComposedSearch": self.search}
        if self.attributes is not None:
            found["Attributes"] = self.attributes.deployment
        return found

    def reserved(self, resource: str) -> float:
        """``"CPU"`` or ``"GPU"`` reserved by the first replicas of every deployment: what a cluster must
        have free before the application answers."""
        setting = RESOURCE_SETTINGS[resource]
        return sum(d.first_replicas * getattr(d, setting) for d in self.deployment_settings().values())

    def fit_problem(self, cluster: Mapping[str, float]) -> str | None:
        """Why this application's first replicas cannot all be placed on a cluster with ``cluster``
        resources (``ray.cluster_resources()``), in one line with what fixes it; None when they can."""
        for resource, setting in RESOURCE_SETTINGS.items():
            need, have = self.reserved(resource), float(cluster.get(resource, 0.0))
            if need <= have + 1e-9:
                continue
            parts = ", ".join(
                f"{name} {d.first_replicas} x {getattr(d, setting):g}"
                for name, d in self.deployment_settings().items()
                if d.first_replicas and getattr(d, setting)
            )
            fixes = (
                f"lower the deployments' {setting} (e.g. embedder.{setting}=0.25, "
                f"attributes.deployment.{setting}=0.25) or add nodes"
            )
            if resource == "CPU":
                fixes = f"start with more logical CPUs (visuray serve --num-cpus {math.ceil(need)}), " + fixes
            return (
                f"the Serve application's first replicas reserve {need:g} {resource}s ({parts}) but the "
                f"cluster has {have:g}: {fixes}"
            )
        return None


# ------------------------------------------------------------------------------ pairing check
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
