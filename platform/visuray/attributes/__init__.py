"""Fine-grained multi-label attributes: label spaces from catalog metadata, a channel-attention semantic
embedding with heads at chosen depths of one shared backbone, imbalance-aware losses, per-label AUC/mAP,
threshold selection, wild-background compositing, the Ray Train job and the predictor Serve loads.

Importing this package is cheap: torch, timm and ray are imported by the functions that need them.
"""
