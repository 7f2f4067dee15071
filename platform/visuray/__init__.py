"""Visuray: distributed training and serving, on Ray, for the models behind e-commerce visual search.

Import cost matters here: the CLI, the tests and the Serve router import this package, so nothing heavy
(torch, ray, deepspeed, faiss) is imported at package level. Submodules import what they need.
"""

__version__ = "0.1.0"
