"""Evaluation metrics on embeddings: retrieval (Recall@k, MAP@R, computed in chunks: never an N x N matrix
in memory), DINO's weighted k-NN, few-shot episodes and zero-shot retrieval. Pure numpy / torch on arrays:
the training loops use them for validation, and :mod:`visuray.index.evaluate` runs them on a catalog."""
