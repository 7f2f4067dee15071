"""Metric fine-tuning of embedding models: the ``finetune`` job.

- :mod:`~visuray.metric_learning.config`: the job's config (pydantic, no torch);
- :mod:`~visuray.metric_learning.losses`: triplet (with :mod:`~visuray.metric_learning.losses.mining`:
  batch-all, batch-hard, semi-hard), the weakly supervised adaptive triplet loss, multi-similarity and
  contrastive losses, each tested against a brute-force reference;
- :mod:`~visuray.metric_learning.samplers`: P x K batches, and batches that favour one product category;
- :mod:`~visuray.metric_learning.weak_labels`: fine-grained classes from product titles (for the ATL);
- :mod:`~visuray.metric_learning.data`: augmentation, training labels, the sampler and its batches;
- :mod:`~visuray.metric_learning.loop`: the per-worker loop on Ray Train + DeepSpeed;
- :mod:`~visuray.metric_learning.job`: the driver (train, publish the model artifact).

It builds on :mod:`visuray.models` and the shared Ray Train wiring in :mod:`visuray.train`; the index,
serving and sweeps build on it.
"""
