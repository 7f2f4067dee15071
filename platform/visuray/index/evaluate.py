"""A model evaluated on a labelled catalog: the catalog embedded with Ray Data (:func:`embed_catalog`, the
index job's path), then leave-one-out retrieval by label, or DINO's k-NN, few-shot episodes and zero-shot
retrieval on held-out classes (:mod:`visuray.evaluation`). What ``visuray eval`` runs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from visuray.evaluation.retrieval import retrieval_metrics
from visuray.evaluation.ssl_eval import TASKS, SSLEvalOptions, evaluate_embeddings
from visuray.index.embed import embed_catalog
from visuray.storage import StorageOptions


def labelled_embeddings(
    model_uri: str, catalog_uri: str, options: StorageOptions | None, batch_size: int
) -> tuple[np.ndarray, list[Any]]:
    """The catalog's items that carry a label, embedded by the model: ``(vectors, labels)``."""
    from visuray.catalog.readers import load_catalog_frame

    ids, vectors = embed_catalog(catalog_uri, model_uri, options, batch_size=batch_size)
    frame = load_catalog_frame(catalog_uri, options, columns=["item_id", "label"])
    label_of = dict(zip(frame["item_id"], frame["label"], strict=True))
    keep = [i for i, item in enumerate(ids) if label_of.get(item) is not None]
    return vectors[keep], [label_of[ids[i]] for i in keep]


def evaluate_model_on_catalog(
    model_uri: str,
    catalog_uri: str,
    ks: Sequence[int] = (1, 5, 10),
    options: StorageOptions | None = None,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Leave-one-out retrieval by label over the catalog's labelled items."""
    vectors, labels = labelled_embeddings(model_uri, catalog_uri, options, batch_size)
    metrics = retrieval_metrics(vectors, labels, ks=ks)
    return {"model": model_uri, "catalog": catalog_uri, **{f"eval/{k}": v for k, v in metrics.items()}}


def evaluate_ssl_on_catalog(
    model_uri: str,
    catalog_uri: str,
    tasks: Sequence[str] = TASKS,
    opts: SSLEvalOptions | None = None,
    options: StorageOptions | None = None,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Run ``tasks`` (k-NN, few-shot, zero-shot) on the embeddings of the catalog's labelled items."""
    vectors, labels = labelled_embeddings(model_uri, catalog_uri, options, batch_size)
    metrics = evaluate_embeddings(vectors, labels, tasks, opts or SSLEvalOptions())
    return {"model": model_uri, "catalog": catalog_uri, "num_items": len(labels), **metrics}
