"""The ``build_index`` job: embed a published catalog with a published model, build FAISS, publish.

The index artifact records the model version it was built with; Serve refuses to pair it with any other
model. The resolved job config (credentials left out) is stored inside the artifact as ``config.yaml``.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Literal

from pydantic import Field, model_validator

from visuray.config import StrictModel, config_to_yaml
from visuray.index.embed import FusionTargets
from visuray.index.ensemble import EnsembleSpec, ensemble_spec
from visuray.storage import StorageOptions

log = logging.getLogger(__name__)

JOB_CONFIG_NAME = "config.yaml"


class BuildIndexConfig(StrictModel):
    """Embed ``catalog`` with the checkpoint ``model`` (or an ``ensemble``) and publish a FAISS index at ``output``."""

    job: Literal["build_index"] = "build_index"
    name: str = "build_index"  # run name, shown in logs and the job summary
    storage: StorageOptions = Field(default_factory=StorageOptions)  # how to reach s3:// URIs

    catalog: str = Field(description="catalog URI (root or version folder) to embed")
    model: str | None = Field(
        None, description="embedding model checkpoint URI (root or version folder); or set `ensemble`"
    )
    ensemble: EnsembleSpec | None = Field(
        None, description="several checkpoints combined by weight; the index records the ensemble version"
    )
    fusion: str | None = Field(
        None,
        description="a fusion model checkpoint URI instead: embeds targets with its image encoder, giving "
        "the index that composed queries (Serve's `fusion.index`) search",
    )
    output: str = Field(description="index URI; versions are published below it")

    factory: str = Field(
        "Flat",
        description="FAISS index-factory string. Flat is exact and fine up to ~1M items at D=128; "
        "IVF{n},PQ{m} for larger catalogs (n ~ 4*sqrt(N)); HNSW32 for low latency without training",
    )
    metric: Literal["ip", "l2"] = Field(
        "ip", description="inner product: cosine similarity, since embedding models emit unit vectors"
    )
    train_size: int | None = Field(
        None, gt=0, description="vectors sampled to train IVF/PQ; None uses all (up to 262,144)"
    )
    nprobe: int | None = Field(
        None, gt=0, description="IVF lists scanned per query; None picks max(8, nlist/8), stored in the index"
    )

    shard_size: int | None = Field(
        None,
        gt=0,
        description="rows per index file; None: one file. ~10M rows of D=128 Flat (5 GB) per shard keeps "
        "each file loadable and lets shards build and load one at a time",
    )

    batch_size: int = Field(
        64, gt=0, description="images per model call; 64 fills a CPU core, use 256+ on GPUs"
    )
    concurrency: int = Field(
        1, gt=0, description="model replicas (Ray actors); one per GPU or a few per node"
    )
    num_cpus_per_actor: float = Field(1, gt=0, description="CPUs reserved by each replica (torch threads)")
    use_gpu: bool = Field(
        False, description="one GPU per replica for embedding, and FAISS GPU for training when available"
    )

    @model_validator(mode="after")
    def _one_encoder(self) -> BuildIndexConfig:
        if self.fusion is not None and (self.model is not None or self.ensemble is not None):
            raise ValueError("build_index: set one of 'model', 'ensemble' or 'fusion'")
        if self.fusion is None:
            ensemble_spec(self.model, self.ensemble, "build_index")
        return self

    def encoder(self) -> EnsembleSpec | FusionTargets:
        if self.fusion is not None:
            return FusionTargets(fusion=self.fusion)
        return ensemble_spec(self.model, self.ensemble, "build_index")


def run_build_index(cfg: BuildIndexConfig) -> dict[str, Any]:
    """Embed, build, publish; returns a summary (index version and URI, counts, timings)."""
    from visuray.cluster import ensure_ray
    from visuray.index.embed import embed_catalog_with_report
    from visuray.index.faiss_index import build_sharded_faiss_index, publish_index
    from visuray.storage import absolute_uri, resolve_artifact

    ensure_ray()
    # Absolute URIs: Ray workers do not share the driver's working directory, and the index records them.
    catalog = resolve_artifact(absolute_uri(cfg.catalog), cfg.storage)
    log.info("build_index %r: catalog %s -> %s", cfg.name, catalog.uri, cfg.output)

    started = time.monotonic()
    embedded = embed_catalog_with_report(
        catalog.uri,
        cfg.encoder(),
        cfg.storage,
        batch_size=cfg.batch_size,
        concurrency=cfg.concurrency,
        num_cpus_per_actor=cfg.num_cpus_per_actor,
        use_gpu=cfg.use_gpu,
    )
    embed_s = time.monotonic() - started
    model_version = embedded.model_version

    started = time.monotonic()
    index = build_sharded_faiss_index(
        embedded.vectors,
        factory=cfg.factory,
        metric=cfg.metric,
        shard_size=cfg.shard_size,
        train_size=cfg.train_size,
        use_gpu=None if cfg.use_gpu else False,
        nprobe=cfg.nprobe,
    )
    build_s = time.monotonic() - started
    log.info("build_index %r: embedded in %.1fs, index built in %.1fs", cfg.name, embed_s, build_s)

    artifact = publish_index(
        cfg.output,
        index,
        embedded.ids,
        model_version=model_version,
        metric=cfg.metric,
        factory=cfg.factory,
        options=cfg.storage,
        extra_metadata={
            **embedded.encoder,
            "catalog_uri": catalog.uri,
            "catalog_version": catalog.manifest.version,
            "num_skipped": len(embedded.skipped),
            "skipped": dict(list(embedded.skipped.items())[:100]),  # a sample, enough to diagnose
        },
        extra_files={JOB_CONFIG_NAME: config_to_yaml(cfg).encode()},
    )
    meta = artifact.manifest.metadata
    return {
        "job": "build_index",
        "name": cfg.name,
        "index": cfg.output,
        "version": artifact.manifest.version,
        "version_uri": artifact.uri,
        "model_version": model_version,
        "catalog_version": catalog.manifest.version,
        "count": meta["count"],
        "dim": meta["dim"],
        "factory": cfg.factory,
        "index_params": meta["index_params"],
        "num_shards": len(meta["shards"]),
        "checksum": meta["checksum"],
        "num_skipped": len(embedded.skipped),
        "embed_seconds": round(embed_s, 2),
        "build_seconds": round(build_s, 2),
    }
