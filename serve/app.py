"""The Visuray Serve application: ``serve run serve/config.yaml`` imports ``serve.app:build_app``.

The deployments (``EmbeddingEnsemble``, ``Fusion``, ``Attributes``, ``Search`` / ``ComposedSearch`` and
the FastAPI ``Router``) and the typed builder live in the library (:mod:`visuray.serving.deployments`,
:mod:`visuray.serving.router`), so that ``visuray serve``, the demo and the tests deploy exactly the
application that this module hands to ``serve run`` / ``serve deploy`` / a KubeRay RayService.
Importing this module loads no model and reads no storage: that happens in the builder and replicas.
"""

from visuray.serving.deployments import (
    AttributesDeployment,
    EmbeddingEnsembleDeployment,
    FusionDeployment,
    Search,
    build_app,
)
from visuray.serving.router import Router

__all__ = [
    "AttributesDeployment",
    "EmbeddingEnsembleDeployment",
    "FusionDeployment",
    "Router",
    "Search",
    "build_app",
]
