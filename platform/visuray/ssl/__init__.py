"""Self-supervised DINO pretraining: the ``pretrain`` job.

- :mod:`~visuray.ssl.config`: the job's config (pydantic, no torch);
- :mod:`~visuray.ssl.dino`: the DINO loss and centering, the multi-crop wrapper, the teacher's EMA update;
- :mod:`~visuray.ssl.heads`: the DINO projection head;
- :mod:`~visuray.ssl.multicrop`: DINO's multi-crop augmentation (the data side);
- :mod:`~visuray.ssl.loop`: the per-worker loop on Ray Train + DeepSpeed ZeRO;
- :mod:`~visuray.ssl.job`: the driver (train, publish the teacher's backbone as a model artifact).

Its schedules are the shared ones in :mod:`visuray.train.schedules`. It builds on :mod:`visuray.models`
and :mod:`visuray.train`; the metric fine-tuning, index and serving packages take its published models as
starting weights.
"""
