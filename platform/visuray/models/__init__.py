"""Models: timm backbones and the embedding model built on them.

Importing this package is cheap; torch and timm are imported by the modules that build models.
"""

from visuray.models.backbone import BackboneConfig
from visuray.models.embedding import EmbeddingModelConfig

__all__ = ["BackboneConfig", "EmbeddingModelConfig"]
