"""Batch embedding of a catalog with Ray Data: a pool of model replicas (actors) over the Parquet shards.

Each actor loads the checkpoint once and embeds batches of encoded images through the same
:func:`visuray.images.decode_image` + :func:`visuray.images.to_model_input` path that Serve uses for
queries, so a catalog item and a query photo of it land on the same vector. The model and catalog are
resolved to their version folders in the driver first: every actor then loads the same version even if a
new one is published while the job runs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydantic import Field

from visuray.config import StrictModel
from visuray.index.ensemble import EnsembleMember, EnsembleSpec
from visuray.storage import StorageOptions

log = logging.getLogger(__name__)


class FusionTargets(StrictModel):
    """Embed catalog images with a fusion model's target encoder: the index that composed queries search."""

    fusion: str = Field(description="fusion model checkpoint URI (root or version folder)")
    loader: str = Field(
        "visuray.predictors:load_fusion_model",
        description="import path of `loader(uri, storage) -> FusionModel`, as in the Serve app args",
    )


Encoder = EnsembleSpec | FusionTargets


class CatalogEmbedder:
    """Ray Data callable class (one encoder per actor: an embedding ensemble or a fusion model's target
    encoder): ``{"item_id", "image"}`` batches in, ``{"item_id", "embedding", "error"}`` out.

    An image that does not decode is not embedded: its row keeps a zero vector and the decode error, and
    the driver drops it and counts it, so one bad file never fails the job.
    """

    def __init__(
        self,
        encoder: Encoder,
        options: StorageOptions | None = None,
        use_gpu: bool = False,
        num_threads: int = 1,
    ) -> None:
        import torch

        from visuray.index.ensemble import EmbeddingEnsemble
        from visuray.predictors import FusionModel, load_checked

        # One actor per CPU slot: torch's default of one thread per core would oversubscribe the node.
        torch.set_num_threads(max(1, num_threads))
        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        if isinstance(encoder, FusionTargets):
            fusion = load_checked(encoder.loader, encoder.fusion, options, self.device, FusionModel)
            self.embed, self.dim = fusion.encode_images, fusion.dim
        else:
            ensemble = EmbeddingEnsemble.load(encoder, options, device=self.device)
            self.embed, self.dim = ensemble.embed, ensemble.dim

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from visuray.images import ImageDecodeError, decode_image

        ids = [str(i) for i in batch["item_id"]]
        errors = [""] * len(ids)
        images, rows = [], []
        for row, data in enumerate(batch["image"]):
            try:
                images.append(decode_image(bytes(data)))
                rows.append(row)
            except ImageDecodeError as exc:
                errors[row] = str(exc)
        embeddings = np.zeros((len(ids), self.dim), dtype=np.float32)
        if images:
            embeddings[rows] = self.embed(images)
        return {"item_id": np.array(ids, dtype=object), "embedding": embeddings, "error": np.array(errors)}


def _fit_actor_pool(concurrency: int, num_cpus_per_actor: float) -> int:
    """Shrink the pool so that the Parquet read tasks keep a CPU: a pool holding every CPU of the
    cluster waits forever for the reads that would feed it. A cluster showing no CPUs yet (an
    autoscaling cluster whose head runs no work) is left to the autoscaler."""
    import ray

    total = float(ray.cluster_resources().get("CPU", 0))
    if total == 0:
        return concurrency
    fitting = max(1, int((total - 1) // num_cpus_per_actor))
    if concurrency > fitting:
        log.warning(
            "%d embedding actor(s) of %s CPU would take all %s CPUs of the cluster: using %d so that the "
            "catalog reads can run",
            concurrency,
            num_cpus_per_actor,
            total,
            fitting,
        )
        return fitting
    return concurrency


@dataclass
class CatalogEmbeddings:
    """Embedded catalog rows, sorted by item id (so the same catalog and model give the same index)."""

    ids: list[str]
    vectors: np.ndarray  # (N, D) float32
    skipped: dict[str, str] = field(default_factory=dict)  # item_id -> why it was not embedded
    model_version: str = ""  # names the vector space: the ensemble (or fusion model) version
    encoder: dict[str, Any] = field(default_factory=dict)  # what embedded them (recorded in the index)


def pin_encoder(model: str | Encoder, options: StorageOptions | None) -> tuple[Encoder, str, dict[str, Any]]:
    """(encoder pinned to version folders, its vector-space version, its description for manifests).

    A checkpoint URI is the one-member ensemble of that model.
    """
    from visuray.index.ensemble import resolve_ensemble
    from visuray.storage import absolute_uri, resolve_artifact

    if isinstance(model, FusionTargets):
        artifact = resolve_artifact(absolute_uri(model.fusion), options)
        version = artifact.manifest.metadata["model_version"]
        pinned = model.model_copy(update={"fusion": artifact.uri})
        return pinned, version, {"fusion": {"version": version, "uri": artifact.uri}}
    spec = model if isinstance(model, EnsembleSpec) else EnsembleSpec(members=[EnsembleMember(uri=model)])
    ensemble = resolve_ensemble(spec, options)
    return ensemble.pinned_spec(), ensemble.version, {"ensemble": ensemble.describe()}


def embed_catalog_with_report(
    catalog_uri: str,
    model: str | Encoder,
    options: StorageOptions | None = None,
    batch_size: int = 64,
    concurrency: int = 1,
    num_cpus_per_actor: float = 1,
    use_gpu: bool = False,
) -> CatalogEmbeddings:
    """Embed every item of a published catalog with a published model, ensemble or fusion model's target
    encoder; see :func:`embed_catalog`."""
    import ray.data

    from visuray.catalog.readers import read_catalog_dataset
    from visuray.storage import absolute_uri, resolve_artifact
    from visuray.train.progress import ItemProgress

    # Pinned to absolute version folders: every actor loads the same models whatever its working directory.
    encoder, model_version, description = pin_encoder(model, options)
    catalog = resolve_artifact(absolute_uri(catalog_uri), options)
    concurrency = _fit_actor_pool(concurrency, num_cpus_per_actor)
    log.info(
        "embedding catalog %s (%s items) with model %s on %d actor(s)",
        catalog.uri,
        catalog.manifest.metadata.get("num_items", "?"),
        model_version,
        concurrency,
    )
    remote_args: dict[str, Any] = {"num_cpus": num_cpus_per_actor}
    if use_gpu:
        remote_args["num_gpus"] = 1
    total = catalog.manifest.metadata.get("num_items")
    progress = ItemProgress("embedding the catalog", int(total) if total else None)
    if progress.enabled:  # this display instead of Ray Data's (ten lines every 10 s where not a terminal);
        # set before the dataset exists, which keeps a copy of the context
        ray.data.DataContext.get_current().enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.ERROR)
    # Blocks of one batch each (streaming, no shuffle): a few small shards are read as a single block,
    # which one actor would otherwise embed alone while the rest of the pool idles.
    blocks = read_catalog_dataset(catalog, options, columns=["item_id", "image"]).repartition(
        target_num_rows_per_block=batch_size
    )
    dataset = blocks.map_batches(
        CatalogEmbedder,
        fn_constructor_kwargs={
            "encoder": encoder,
            "options": options,
            "use_gpu": use_gpu,
            "num_threads": max(1, int(num_cpus_per_actor)),
        },
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=concurrency),
        **remote_args,
    )
    ids: list[str] = []
    chunks: list[np.ndarray] = []
    skipped: dict[str, str] = {}
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        progress.advance(len(batch["item_id"]))
        ok = batch["error"] == ""
        for item_id, error in zip(batch["item_id"][~ok], batch["error"][~ok], strict=True):
            skipped[str(item_id)] = str(error)
        ids.extend(str(i) for i in batch["item_id"][ok])
        chunks.append(np.asarray(batch["embedding"][ok], dtype=np.float32))
    progress.close()
    if skipped:
        log.warning(
            "skipped %d item(s) whose image did not decode, e.g. %s", len(skipped), next(iter(skipped))
        )
    if not ids:
        raise ValueError(f"no item of catalog {catalog.uri} could be embedded ({len(skipped)} skipped)")
    vectors = np.concatenate(chunks)
    order = np.argsort(np.array(ids, dtype=object), kind="stable")
    log.info("embedded %d item(s), dim %d", len(ids), vectors.shape[1])
    return CatalogEmbeddings(
        [ids[i] for i in order], np.ascontiguousarray(vectors[order]), skipped, model_version, description
    )


def embed_catalog(
    catalog_uri: str,
    model: str | Encoder,
    options: StorageOptions | None = None,
    batch_size: int = 64,
    concurrency: int = 1,
    num_cpus_per_actor: float = 1,
    use_gpu: bool = False,
) -> tuple[list[str], np.ndarray]:
    """Item ids and their float32 embeddings (sorted by id) for a published catalog.

    ``model`` is a checkpoint URI or an :class:`~visuray.index.ensemble.EnsembleSpec`.
    ``concurrency`` model replicas (Ray actors, ``num_cpus_per_actor`` CPUs and one GPU each when
    ``use_gpu``) embed ``batch_size`` images at a time. Items whose image does not decode are skipped
    and logged; :func:`embed_catalog_with_report` also returns them.
    """
    result = embed_catalog_with_report(
        catalog_uri, model, options, batch_size, concurrency, num_cpus_per_actor, use_gpu
    )
    return result.ids, result.vectors
