"""Composed retrieval: a query is a reference image plus a modifying text ("same, but in red").

Image tokens (timm ``forward_features``) and text tokens (a small transformer trained from scratch on a
tokenizer trained on the catalog's own text) are fused by MAAF or a residual attention fusion, or by one
of the baselines, into one query vector that is compared with the target images' embeddings.
"""
