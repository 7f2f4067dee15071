"""Models: timm backbones, their pretrained weights, and the embedding model built on them.

- :mod:`~visuray.models.config`: ``BackboneConfig`` and ``EmbeddingModelConfig`` (pydantic, no torch);
- :mod:`~visuray.models.backbone`: building a backbone from the timm registry, block depths, freezing;
- :mod:`~visuray.models.weights` and :mod:`~visuray.models.key_maps`: pretrained weights from every source
  and layout, loaded strictly;
- :mod:`~visuray.models.embedding`: the embedding model and its artifact (save, resolve, load);
- :mod:`~visuray.models.batchnorm`: re-estimating BatchNorm statistics.

The task packages (ssl, metric, fusion, attributes) build on it; it imports none of them. Importing this
package is cheap: torch and timm come with the modules that build models.
"""

from visuray.models.config import BackboneConfig, EmbeddingModelConfig

__all__ = ["BackboneConfig", "EmbeddingModelConfig"]
