"""An ensemble of embedding models: one vector per image from several checkpoints, and its version.

Each member's output is L2-normalised, then the members are combined by weight:

- ``concat``: member ``i`` is scaled by ``sqrt(w_i / sum(w))`` and the results are concatenated. The
  vector stays unit-norm and the inner product of two ensemble vectors is the weighted mean of the
  members' cosine similarities; the dimension is the sum of the members'.
- ``mean``: the weighted mean of the unit vectors, re-normalised. The members must share a dimension;
  the index stays as small as one member's.

The ensemble *version* identifies the vector space: a hash of the member model versions, the normalised
weights and the combine mode. Indexes record it as their ``model_version`` and Serve pairs an index with
an ensemble by it. A one-member ensemble emits exactly its member's (unit) vectors, so its version is the
member's model version and indexes built from a single model stay valid.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field

from visuray.config import StrictModel
from visuray.storage import Artifact, StorageOptions

# The layout the embedder keeps weights and inputs in: channels-last (default) or PyTorch's default.
MemoryFormat = Literal["channels_last", "contiguous"]

if TYPE_CHECKING:
    from PIL import Image

Combine = Literal["concat", "mean"]
ENSEMBLE_PREFIX = "ensemble-"


class EnsembleMember(StrictModel):
    uri: str = Field(description="embedding model checkpoint URI (root or version folder)")
    weight: float = Field(1.0, gt=0, description="relative weight; equal weights trust every member alike")


class EnsembleSpec(StrictModel):
    """Which models embed images, and how their vectors are combined."""

    members: list[EnsembleMember] = Field(min_length=1, description="one member is a valid ensemble")
    combine: Combine = Field(
        "concat",
        description="concat keeps every member's information (dim = sum of dims); mean needs equal dims "
        "and keeps the index as small as one member's",
    )


def ensemble_spec(model: str | None, ensemble: EnsembleSpec | None, where: str) -> EnsembleSpec:
    """The ensemble named by a config's ``model`` (one checkpoint) or ``ensemble`` field: exactly one."""
    if (model is None) == (ensemble is None):
        raise ValueError(f"{where}: set exactly one of 'model' (one checkpoint URI) or 'ensemble'")
    return ensemble if ensemble is not None else EnsembleSpec(members=[EnsembleMember(uri=model)])


def normalised_weights(weights: Sequence[float]) -> list[float]:
    total = float(sum(weights))
    return [float(w) / total for w in weights]


def ensemble_version(member_versions: Sequence[str], weights: Sequence[float], combine: Combine) -> str:
    """The version of the vector space an ensemble emits (see the module docstring)."""
    if len(member_versions) != len(weights) or not member_versions:
        raise ValueError("need one weight per member and at least one member")
    if len(member_versions) == 1:
        return member_versions[0]
    payload = {
        "combine": combine,
        # Rounded so that (1, 1) and (0.5, 0.5) -- the same vectors -- give the same version.
        "members": [
            [v, round(w, 6)] for v, w in zip(member_versions, normalised_weights(weights), strict=True)
        ],
    }
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
    return ENSEMBLE_PREFIX + digest[:16]


def combine_embeddings(
    outputs: Sequence[np.ndarray], weights: Sequence[float], combine: Combine
) -> np.ndarray:
    """Combine per-member (N, D_i) embeddings into unit (N, D) float32 ensemble vectors."""
    units = [_unit_rows(np.asarray(o, dtype=np.float32)) for o in outputs]
    shares = normalised_weights(weights)
    if combine == "concat":
        return np.concatenate(
            [u * np.float32(np.sqrt(s)) for u, s in zip(units, shares, strict=True)], axis=1
        )
    if combine == "mean":
        dims = {u.shape[1] for u in units}
        if len(dims) != 1:
            raise ValueError(f"combine 'mean' needs members of one dimension, got {sorted(dims)}")
        return _unit_rows(sum(u * np.float32(s) for u, s in zip(units, shares, strict=True)))
    raise ValueError(f"unknown combine mode {combine!r}; use 'concat' or 'mean'")


def _unit_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)


@dataclass
class ResolvedEnsemble:
    """An ensemble pinned to member version folders (read from manifests only: no weights loaded)."""

    members: list[Artifact]
    weights: list[float]
    combine: Combine
    version: str
    dim: int

    @property
    def member_versions(self) -> list[str]:
        return [m.manifest.metadata["model_version"] for m in self.members]

    def pinned_spec(self) -> EnsembleSpec:
        """The same ensemble with every member URI pinned to its version folder."""
        return EnsembleSpec(
            members=[
                EnsembleMember(uri=m.uri, weight=w) for m, w in zip(self.members, self.weights, strict=True)
            ],
            combine=self.combine,
        )

    def describe(self) -> dict[str, Any]:
        """What indexes record and /v1/models shows: the version, and each member's version and weight."""
        return {
            "version": self.version,
            "dim": self.dim,
            "combine": self.combine,
            "members": [
                {
                    "version": m.manifest.metadata["model_version"],
                    "uri": m.uri,
                    "weight": w,
                    "embedding_dim": int(m.manifest.metadata["embedding_dim"]),
                    "backbone": m.manifest.metadata.get("backbone"),
                    "img_size": int(m.manifest.metadata["img_size"]),
                }
                for m, w in zip(self.members, self.weights, strict=True)
            ],
        }


def resolve_ensemble(spec: EnsembleSpec, options: StorageOptions | None = None) -> ResolvedEnsemble:
    """Resolve every member to its published version and compute the ensemble's version and dimension."""
    from visuray.models.embedding import resolve_model
    from visuray.storage import absolute_uri

    members = [resolve_model(absolute_uri(m.uri), options) for m in spec.members]
    dims = [int(m.manifest.metadata["embedding_dim"]) for m in members]
    if spec.combine == "mean" and len(set(dims)) != 1:
        raise ValueError(f"combine 'mean' needs members of one embedding dimension, got {dims}")
    weights = [m.weight for m in spec.members]
    versions = [m.manifest.metadata["model_version"] for m in members]
    return ResolvedEnsemble(
        members=members,
        weights=weights,
        combine=spec.combine,
        version=ensemble_version(versions, weights, spec.combine),
        dim=sum(dims) if spec.combine == "concat" else dims[0],
    )


class EmbeddingEnsemble:
    """The loaded member models: ``embed(images)`` -> unit (N, dim) float32 ensemble vectors.

    Every member sees the images through :func:`visuray.images.to_model_input` at its own input size and
    normalisation (its weights' mean and std, recorded in the model): the one preprocessing path shared by
    the index job and Serve.
    """

    def __init__(
        self, resolved: ResolvedEnsemble, device: str = "cpu", memory_format: MemoryFormat = "channels_last"
    ) -> None:
        import torch

        from visuray.models.embedding import load_embedding_model

        self.resolved = resolved
        self.device = device
        # Channels-last weights and inputs: the CPU convolution kernels' own layout, 1.9x the images/s of
        # the default layout for EfficientNet-Lite0 at 224 px on 2 cores, same vectors within 1e-5
        # (benchmarks/embed_forward.py). ViTs only convolve in their patch embedding; it costs them nothing.
        self.memory_format = getattr(torch, memory_format.replace("contiguous", "contiguous_format"))
        self.models = [
            load_embedding_model(m.uri, m.options, map_location=device)[0].to(
                memory_format=self.memory_format
            )
            for m in resolved.members
        ]

    @classmethod
    def load(
        cls,
        spec: EnsembleSpec,
        options: StorageOptions | None = None,
        device: str = "cpu",
        memory_format: MemoryFormat = "channels_last",
    ) -> EmbeddingEnsemble:
        return cls(resolve_ensemble(spec, options), device, memory_format)

    @property
    def version(self) -> str:
        return self.resolved.version

    @property
    def dim(self) -> int:
        return self.resolved.dim

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        import torch

        from visuray.images import to_model_input

        if not images:
            return np.zeros((0, self.dim), dtype=np.float32)
        outputs = []
        with torch.inference_mode():
            for model in self.models:
                batch = to_model_input(images, model.input_spec).to(
                    self.device, memory_format=self.memory_format
                )
                outputs.append(model(batch).float().cpu().numpy())
        return combine_embeddings(outputs, self.resolved.weights, self.resolved.combine)
