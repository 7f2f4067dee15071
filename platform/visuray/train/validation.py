"""Validation during training: retrieval metrics on a held-out labelled catalog, reported with the losses.

A training job with a ``validation`` section embeds the validation catalog every ``validation.every``
steps (and at the last step) and reports ``val/recall@k`` and ``val/map@r`` (leave-one-out retrieval:
every photo queries all the others; a hit shares its label). These are the metrics a sweep's early
stopping (ASHA) ranks trials by, so they must come from photos the job does not train on: give a catalog
of other classes (class-disjoint, the zero-shot protocol) or of other photos of the same classes.

Every rank takes part in the forward passes (under ZeRO-3 a forward is collective: parameters are
gathered from all ranks), each embedding a strided share of the photos in the same number of batches;
rank 0 gathers the embeddings and computes the metrics with the chunked FAISS evaluation.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

from pydantic import Field, field_validator

from visuray.config import StrictModel
from visuray.images import InputSpec
from visuray.storage import StorageOptions


class ValidationSection(StrictModel):
    catalog: str | None = Field(
        None,
        description="labelled catalog evaluated during training (leave-one-out retrieval); none: no val/* "
        "metrics. Use photos the job does not train on (e.g. other classes)",
    )
    every: int = Field(50, ge=1, description="steps between evaluations (also at the last step)")
    max_items: int = Field(
        2000, ge=2, description="photos evaluated at most (a fixed random subset): bounds the time per check"
    )
    ks: list[int] = Field(default_factory=lambda: [1, 5], description="Recall@k cut-offs reported")
    batch_size: int = Field(64, ge=1, description="photos per forward pass")
    seed: int = Field(0, description="which subset of photos when the catalog has more than max_items")

    @field_validator("ks")
    @classmethod
    def _positive_ks(cls, ks: list[int]) -> list[int]:
        if not ks or any(k < 1 for k in ks):
            raise ValueError("ks must be a non-empty list of positive integers")
        return sorted(set(ks))


def validation_metric_names(section: ValidationSection) -> set[str]:
    """The ``val/*`` metric names a job with this section reports (empty without a catalog)."""
    if section.catalog is None:
        return set()
    return {f"val/recall@{k}" for k in section.ks} | {"val/map@r"}


class ValidationSet:
    """The validation photos, preprocessed once (eval transform: resize, centre crop, normalise)."""

    def __init__(self, inputs: Any, labels: Sequence[int], section: ValidationSection) -> None:
        self.inputs = inputs  # (N, 3, S, S) float32, CPU
        self.labels = list(labels)
        self.section = section

    @classmethod
    def load(cls, section: ValidationSection, options: StorageOptions, spec: InputSpec) -> ValidationSet:
        from visuray.catalog.readers import NO_LABEL, CatalogRows
        from visuray.images import to_model_input

        assert section.catalog is not None
        rows = CatalogRows(section.catalog, options)
        labelled = [i for i in range(len(rows)) if rows.labels[i] != NO_LABEL]
        if len(labelled) < 2:
            raise ValueError(
                f"validation catalog {section.catalog} has {len(labelled)} labelled photos; need 2+"
            )
        if len(labelled) > section.max_items:
            labelled = sorted(random.Random(section.seed).sample(labelled, section.max_items))
        inputs = to_model_input([rows.image(i) for i in labelled], spec)
        return cls(inputs, [rows.labels[i] for i in labelled], section)

    def __len__(self) -> int:
        return len(self.labels)

    def evaluate(
        self, embed: Callable[[Any], Any], rank: int = 0, world_size: int = 1
    ) -> dict[str, float] | None:
        """``embed`` maps an input batch to embeddings (no grad, eval mode: the caller's business).
        Returns the metrics on rank 0 and None on the other ranks."""
        import numpy as np
        import torch

        from visuray.evaluation.retrieval import retrieval_metrics

        share = list(range(rank, len(self), world_size))
        per_rank = -(-len(self) // world_size)
        batches = -(-per_rank // self.section.batch_size)  # the same count on every rank
        outputs = []
        with torch.no_grad():
            for b in range(batches):
                chunk = share[b * self.section.batch_size : (b + 1) * self.section.batch_size]
                # A rank with nothing left still runs a forward (of one photo) to keep collectives in step.
                batch = self.inputs[chunk or [0]]
                out = embed(batch).float().cpu().numpy()
                if chunk:
                    outputs.append(out)
        local = np.concatenate(outputs) if outputs else np.zeros((0, 1), np.float32)
        if world_size > 1:
            import torch.distributed as dist

            gathered: list[Any] = [None] * world_size
            dist.all_gather_object(gathered, (share, local))
        else:
            gathered = [(share, local)]
        if rank != 0:
            return None
        dim = max(part.shape[1] for _, part in gathered if len(part))
        vectors = np.zeros((len(self), dim), np.float32)
        for indices, part in gathered:
            if len(part):
                vectors[indices] = part
        metrics = retrieval_metrics(vectors, self.labels, ks=self.section.ks, metric="ip")
        out = {f"val/recall@{k}": float(metrics[f"recall@{k}"]) for k in self.section.ks}
        out["val/map@r"] = float(metrics["map@r"])
        return out
