"""What the Fusion and Attributes deployments (and the index job's fusion targets) need from a model, and
the loaders that provide it: the neutral ground between the task packages and indexing/serving.

The deployments depend on these two small interfaces, not on the training packages: the default loaders
adapt :class:`visuray.fusion.predict.FusionPredictor` and
:class:`visuray.attributes.predict.AttributePredictor`; another implementation is plugged in by naming its
loader's import path in ``ServeAppArgs.fusion.loader`` / ``attributes.loader``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from visuray.storage import StorageOptions

if TYPE_CHECKING:
    from PIL import Image


@runtime_checkable
class FusionModel(Protocol):
    """Composed retrieval: (reference image, modifying text) -> a query vector in the target space."""

    version: str  # names the target space: an index of targets records it as its model_version

    @property
    def dim(self) -> int: ...

    def encode_queries(self, images: Sequence[Image.Image], texts: Sequence[str]) -> np.ndarray:
        """(N, dim) float32 unit query vectors, one per (image, text)."""
        ...

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """(N, dim) float32 unit vectors of target images (what the composed index holds)."""
        ...


@runtime_checkable
class AttributeModel(Protocol):
    """Multi-label attributes: image -> a score per label, and each label's decision threshold."""

    version: str
    thresholds: Mapping[str, float]

    def predict(self, images: Sequence[Image.Image]) -> list[dict[str, float]]:
        """One ``{label: score}`` per image, every label."""
        ...


class FusionPredictorModel:
    """:class:`visuray.fusion.predict.FusionPredictor` as a :class:`FusionModel`."""

    def __init__(self, predictor: Any) -> None:
        self.predictor = predictor
        self.version: str = predictor.version

    @property
    def dim(self) -> int:
        return int(self.predictor.dim)

    def encode_queries(self, images: Sequence[Image.Image], texts: Sequence[str]) -> np.ndarray:
        encodings = self.predictor.encode_queries(list(images), list(texts))
        return np.stack([e.vector for e in encodings]).astype(np.float32)

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        return self.predictor.encode_images(list(images))


def load_fusion_model(uri: str, storage: StorageOptions | None = None, device: str = "cpu") -> FusionModel:
    """The default fusion loader: a published fusion model artifact."""
    from visuray.fusion.predict import FusionPredictor

    return FusionPredictorModel(FusionPredictor.load(uri, storage, device=device))


def load_attribute_model(
    uri: str, storage: StorageOptions | None = None, device: str = "cpu"
) -> AttributeModel:
    """The default attribute loader: a published attribute model artifact (it already fits the interface)."""
    from visuray.attributes.predict import AttributePredictor

    return AttributePredictor.load(uri, storage, device=device)


# Where the default loaders lived before the serving package: Serve configs written then still name it.
MOVED_LOADER_MODULES = {"visuray.serving_adapters": "visuray.predictors"}


def import_loader(path: str) -> Callable[..., Any]:
    """The callable at ``module:attribute`` (dots allowed in the attribute, e.g. ``mod:Class.load``)."""
    module_name, _, attribute = path.partition(":")
    module_name = MOVED_LOADER_MODULES.get(module_name, module_name)
    if not module_name or not attribute:
        raise ValueError(f"loader {path!r} must look like 'package.module:function'")
    target: Any = importlib.import_module(module_name)
    for part in attribute.split("."):
        target = getattr(target, part)
    if not callable(target):
        raise TypeError(f"loader {path!r} is not callable")
    return target


def load_checked(path: str, uri: str, storage: StorageOptions, device: str, interface: type) -> Any:
    """Load a model with the loader at ``path`` and check that it provides ``interface``."""
    model = import_loader(path)(uri, storage, device=device)
    if not isinstance(model, interface):
        raise TypeError(f"loader {path} returned {type(model).__name__}, which is not a {interface.__name__}")
    return model
