"""Loading an exported attribute model and predicting labels for the ``attributes`` deployment.

``AttributePredictor.load(uri, options)`` reads the artifact (checksums verified, weights loaded strictly);
``predict(images)`` returns one ``{label: score}`` dict per image (sigmoid scores, every label), and
``positives(images)`` only the labels whose score reaches the label's threshold (chosen on validation
data when the model was trained). Images may be PIL images or encoded bytes; preprocessing is
:func:`visuray.images.to_model_input`, the same as the index and the other deployments.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from visuray.images import InputSpec
from visuray.storage import StorageOptions

if TYPE_CHECKING:
    from PIL import Image


class AttributePredictor:
    """One loaded attribute model: label names, groups, thresholds, and batched prediction."""

    def __init__(
        self, model: Any, labels: dict[str, Any], spec: InputSpec, version: str, device: Any
    ) -> None:
        self.model = model
        self.label_names: list[str] = list(labels["labels"])
        self.groups: dict[str, list[str]] = dict(labels["groups"])
        self.thresholds: dict[str, float] = {k: float(v) for k, v in labels["thresholds"].items()}
        self.spec = spec  # the model's input size and normalisation, as it was trained
        self.version = version
        self.device = device

    @classmethod
    def load(cls, uri: str, options: StorageOptions | None = None, device: str = "cpu") -> AttributePredictor:
        from visuray.attributes.export import load_attribute_model

        model, cfg, labels, artifact = load_attribute_model(uri, options, map_location=device)
        return cls(model, labels, cfg.backbone.input_spec, artifact.manifest.version, device)

    def scores(self, images: Sequence[Image.Image | bytes], batch_size: int = 64) -> Any:
        """(N, L) numpy array of sigmoid scores in :attr:`label_names` order."""
        import numpy as np
        import torch

        from visuray.images import decode_image, to_model_input

        pil = [decode_image(i) if isinstance(i, bytes | bytearray) else i for i in images]
        out = []
        with torch.no_grad():
            for start in range(0, len(pil), batch_size):
                batch = to_model_input(pil[start : start + batch_size], self.spec).to(self.device)
                out.append(torch.sigmoid(self.model(batch)).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, len(self.label_names)), dtype=np.float32)

    def predict(self, images: Sequence[Image.Image | bytes]) -> list[dict[str, float]]:
        """One ``{label: score}`` per image, every label."""
        return [dict(zip(self.label_names, map(float, row), strict=True)) for row in self.scores(images)]

    def positives(self, images: Sequence[Image.Image | bytes]) -> list[dict[str, float]]:
        """One ``{label: score}`` per image, only labels at or above their threshold."""
        return [
            {label: s for label, s in scores.items() if s >= self.thresholds[label]}
            for scores in self.predict(images)
        ]
