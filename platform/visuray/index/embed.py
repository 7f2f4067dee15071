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

from visuray.storage import StorageOptions

log = logging.getLogger(__name__)


class CatalogEmbedder:
    """Ray Data callable class: ``{"item_id", "image"}`` batches in, ``{"item_id", "embedding", "error"}`` out.

    An image that does not decode is not embedded: its row keeps a zero vector and the decode error, and
    the driver drops it and counts it, so one bad file never fails the job.
    """

    def __init__(
        self,
        model_uri: str,
        options: StorageOptions | None = None,
        use_gpu: bool = False,
        num_threads: int = 1,
    ) -> None:
        import torch

        from visuray.checkpoint import load_embedding_model

        # One actor per CPU slot: torch's default of one thread per core would oversubscribe the node.
        torch.set_num_threads(max(1, num_threads))
        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.model, artifact = load_embedding_model(model_uri, options, map_location=self.device)
        self.img_size = int(artifact.manifest.metadata["img_size"])
        self.dim = int(artifact.manifest.metadata["embedding_dim"])

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        from visuray.images import ImageDecodeError, decode_image, to_model_input

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
            with torch.inference_mode():
                out = self.model(to_model_input(images, self.img_size).to(self.device))
            embeddings[rows] = out.float().cpu().numpy()
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


def embed_catalog_with_report(
    catalog_uri: str,
    model_uri: str,
    options: StorageOptions | None = None,
    batch_size: int = 64,
    concurrency: int = 1,
    num_cpus_per_actor: float = 1,
    use_gpu: bool = False,
) -> CatalogEmbeddings:
    """Embed every item of a published catalog with a published model; see :func:`embed_catalog`."""
    import ray.data

    from visuray.catalog.readers import read_catalog_dataset
    from visuray.checkpoint import resolve_model
    from visuray.storage import absolute_uri, resolve_artifact

    # Pinned to absolute version folders: every actor loads the same model whatever its working directory.
    model = resolve_model(absolute_uri(model_uri), options)
    catalog = resolve_artifact(absolute_uri(catalog_uri), options)
    concurrency = _fit_actor_pool(concurrency, num_cpus_per_actor)
    log.info(
        "embedding catalog %s (%s items) with model %s on %d actor(s)",
        catalog.uri,
        catalog.manifest.metadata.get("num_items", "?"),
        model.manifest.metadata.get("model_version"),
        concurrency,
    )
    remote_args: dict[str, Any] = {"num_cpus": num_cpus_per_actor}
    if use_gpu:
        remote_args["num_gpus"] = 1
    # Blocks of one batch each (streaming, no shuffle): a few small shards are read as a single block,
    # which one actor would otherwise embed alone while the rest of the pool idles.
    blocks = read_catalog_dataset(catalog, options, columns=["item_id", "image"]).repartition(
        target_num_rows_per_block=batch_size
    )
    dataset = blocks.map_batches(
        CatalogEmbedder,
        fn_constructor_kwargs={
            "model_uri": model.uri,
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
        ok = batch["error"] == ""
        for item_id, error in zip(batch["item_id"][~ok], batch["error"][~ok], strict=True):
            skipped[str(item_id)] = str(error)
        ids.extend(str(i) for i in batch["item_id"][ok])
        chunks.append(np.asarray(batch["embedding"][ok], dtype=np.float32))
    if skipped:
        log.warning(
            "skipped %d item(s) whose image did not decode, e.g. %s", len(skipped), next(iter(skipped))
        )
    if not ids:
        raise ValueError(f"no item of catalog {catalog.uri} could be embedded ({len(skipped)} skipped)")
    vectors = np.concatenate(chunks)
    order = np.argsort(np.array(ids, dtype=object), kind="stable")
    log.info("embedded %d item(s), dim %d", len(ids), vectors.shape[1])
    return CatalogEmbeddings([ids[i] for i in order], np.ascontiguousarray(vectors[order]), skipped)


def embed_catalog(
    catalog_uri: str,
    model_uri: str,
    options: StorageOptions | None = None,
    batch_size: int = 64,
    concurrency: int = 1,
    num_cpus_per_actor: float = 1,
    use_gpu: bool = False,
) -> tuple[list[str], np.ndarray]:
    """Item ids and their float32 embeddings (sorted by id) for a published catalog.

    ``concurrency`` model replicas (Ray actors, ``num_cpus_per_actor`` CPUs and one GPU each when
    ``use_gpu``) embed ``batch_size`` images at a time. Items whose image does not decode are skipped
    and logged; :func:`embed_catalog_with_report` also returns them.
    """
    result = embed_catalog_with_report(
        catalog_uri, model_uri, options, batch_size, concurrency, num_cpus_per_actor, use_gpu
    )
    return result.ids, result.vectors
