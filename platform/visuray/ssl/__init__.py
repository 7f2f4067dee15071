"""Self-supervised pretraining (DINO): loss and centering, projection head, multi-crop, schedules.

The modules here are plain torch building blocks with explicit arguments; the Ray Train + DeepSpeed loop
that composes them lives in :mod:`visuray.train.pretrain`.
"""
