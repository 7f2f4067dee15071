"""The Visuray Serve application: ``serve run serve/config.yaml`` imports ``serve.app:build_app``.

The deployments (``Embedder``, ``Search`` and the FastAPI ``Router``) and the typed builder live in the
library (:mod:`visuray.serving_app`), so that ``visuray serve``, the demo and the tests deploy exactly the
application that this module hands to ``serve run`` / ``serve deploy`` / a KubeRay RayService.
Importing this module loads no model and reads no storage: that happens in the builder and replicas.
"""

from visuray.serving_app import Embedder, Router, Search, build_app

__all__ = ["Embedder", "Router", "Search", "build_app"]
