"""The Serve application: an HTTP router in front of embedding, fusion, attribute and search deployments.

Modules, each importing only those listed after it:

- :mod:`~visuray.serving.start`: deploy the application on a running cluster and wait for it to answer;
- :mod:`~visuray.serving.deployments`: the model and search deployments and the typed builder
  ``build_app(ServeAppArgs)`` (what ``serve/app.py`` exposes to ``serve run`` / ``serve deploy``);
- :mod:`~visuray.serving.router`: the FastAPI ingress ``Router`` (routes, web page, error answers);
- :mod:`~visuray.serving.schemas`: request/response models and the parsing of untrusted input;
- :mod:`~visuray.serving.catalog_items`: catalog metadata and images for the router;
- :mod:`~visuray.serving.security`: optional API keys;
- :mod:`~visuray.serving.metrics`: the router's Prometheus metrics;
- :mod:`~visuray.serving.args`: ``ServeAppArgs`` and the index/model pairing check.

The package imports the model side (:mod:`visuray.index`, :mod:`visuray.predictors`), never the other way
round. Importing it is light: the names below need no torch, faiss or Ray until called.
"""

from visuray.serving.args import (
    AttributesArgs,
    FusionArgs,
    IncompatibleIndexError,
    ServeAppArgs,
    check_index_matches_model,
)
from visuray.serving.start import APP_NAME, direct_ingress_urls, start_serve_app

__all__ = [
    "APP_NAME",
    "AttributesArgs",
    "FusionArgs",
    "IncompatibleIndexError",
    "ServeAppArgs",
    "check_index_matches_model",
    "direct_ingress_urls",
    "start_serve_app",
]
