"""Weights as published artifacts, whatever the model: safetensors weights plus the config that rebuilds it.

Every model artifact (an embedding model in :mod:`visuray.models.embedding`, a fusion or attribute model in
their task packages) is written by :func:`publish_weights`: ``model.safetensors`` (no pickle, so loading
runs no code), the model's config (``model.yaml`` or the task's own name), ``config.yaml`` (the resolved
job config that produced it, for reproduction) and any extra files, with manifest metadata that says
``model_version`` (the artifact version), ``task``, what the model is, and ``code_version``. Loading is
strict (:func:`load_state_dict_strict`). This module knows no model: the models import it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel

from visuray import __version__
from visuray.config import ConfigError, config_to_yaml, validate_config, yaml_load
from visuray.storage import (
    WEIGHTS_NAME,
    Artifact,
    ArtifactError,
    ArtifactWriter,
    StorageOptions,
    resolve_artifact,
)

if TYPE_CHECKING:
    import torch
    from torch import nn

C = TypeVar("C", bound=BaseModel)
MODEL_CONFIG_NAME = "model.yaml"  # the model config's default name in its artifact
JOB_CONFIG_NAME = "config.yaml"


class CheckpointError(ArtifactError):
    """A checkpoint that does not fit the model it is loaded into (missing, extra or reshaped tensors)."""


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel (or similar ``.module``) wrapper."""
    from torch import nn

    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def state_dict_bytes(model: nn.Module) -> bytes:
    """The model's state dict serialised with safetensors (CPU, contiguous copies)."""
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in unwrap_model(model).state_dict().items()}
    return save(tensors)


def tensors_from_bytes(data: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(data)


def load_state_dict_strict(module: nn.Module, tensors: Mapping[str, torch.Tensor], source: str) -> None:
    """Load ``tensors`` into ``module``; any missing, unexpected or reshaped key is a :class:`CheckpointError`."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    reshaped = sorted(
        f"{k}: checkpoint {tuple(tensors[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in tensors and tuple(tensors[k].shape) != tuple(v.shape)
    )
    problems = []
    for title, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", reshaped)):
        if keys:
            shown = ", ".join(keys[:8]) + (f" (+{len(keys) - 8} more)" if len(keys) > 8 else "")
            problems.append(f"{title}: {shown}")
    if problems:
        raise CheckpointError(f"checkpoint {source} does not fit the model: " + "; ".join(problems))
    module.load_state_dict(dict(tensors), strict=True)


def publish_weights(
    uri: str,
    kind: str,
    model: nn.Module,
    model_cfg: BaseModel,
    task: str,
    described: Mapping[str, Any],
    job_cfg: BaseModel | None = None,
    metadata: Mapping[str, Any] | None = None,
    files: Mapping[str, str | bytes | Path] | None = None,
    options: StorageOptions | None = None,
    config_name: str = MODEL_CONFIG_NAME,
) -> Artifact:
    """A new version of a weights artifact of ``kind`` at ``uri`` (embedding, fusion and attribute models
    share this layout): ``model.safetensors``, ``model_cfg`` as ``config_name`` (``model.yaml``),
    ``config.yaml`` when ``job_cfg`` is given, and ``files`` (text, bytes, or a local file's path to copy).

    Manifest metadata: ``task``, the caller's ``metadata``, then what cannot be overridden because it
    describes the files just written: ``model_version``, ``described`` (dimensions, backbone, ...),
    ``code_version`` and ``format``."""
    with ArtifactWriter(uri, kind, options) as writer:
        writer.write_bytes(WEIGHTS_NAME, state_dict_bytes(model))
        writer.write_text(config_name, config_to_yaml(model_cfg))
        if job_cfg is not None:
            writer.write_text(JOB_CONFIG_NAME, config_to_yaml(job_cfg))
        for name, content in (files or {}).items():
            if isinstance(content, Path):
                writer.put_file(name, content)
            elif isinstance(content, bytes):
                writer.write_bytes(name, content)
            else:
                writer.write_text(name, content)
        meta = {
            "task": task,
            **dict(metadata or {}),
            "model_version": writer.version,
            **dict(described),
            "code_version": __version__,
            "format": "safetensors",
        }
        return writer.publish(meta)


def read_config(artifact: Artifact, model: type[C], name: str = MODEL_CONFIG_NAME) -> C:
    """The model config ``name`` of ``artifact``, validated into ``model``; a file that does not validate
    is a :class:`CheckpointError` naming the file and the keys."""
    data = yaml_load(artifact.read(name).decode())
    try:
        return validate_config(model, data or {}, f"{artifact.uri}/{name}")
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None


def resolve_kind(uri: str, kind: str, options: StorageOptions | None = None) -> Artifact:
    """The published artifact at ``uri`` (root or version folder), refused unless it is of ``kind``."""
    artifact = resolve_artifact(uri, options)
    if artifact.manifest.kind != kind:
        raise ArtifactError(f"{uri} is a {artifact.manifest.kind!r} artifact, not a {kind!r}")
    return artifact
