"""Fine-grained multi-label attributes: the ``train_attributes`` job and the predictor Serve loads.

- :mod:`~visuray.attributes.config`: the model's and the job's configs (pydantic, no torch);
- :mod:`~visuray.attributes.labels`: label spaces from catalog metadata;
- :mod:`~visuray.attributes.model`: the channel-attention semantic embedding (and the pooled baseline) with
  heads at chosen depths of one shared backbone; :mod:`~visuray.attributes.losses`: imbalance-aware losses;
- :mod:`~visuray.attributes.data`: splits by product, images as uint8 tensors, batches, the prepared
  catalog; :mod:`~visuray.attributes.backgrounds`: wild-background compositing;
- :mod:`~visuray.attributes.fit`: one training step and an in-process loop (benchmarks, the demo);
- :mod:`~visuray.attributes.loop`, :mod:`~visuray.attributes.job`: the per-worker loop and the driver;
- :mod:`~visuray.attributes.metrics`, :mod:`~visuray.attributes.thresholds`,
  :mod:`~visuray.attributes.evaluate`: per-label AUC/mAP, thresholds, held-out evaluation;
- :mod:`~visuray.attributes.export`, :mod:`~visuray.attributes.predict`: the artifact and the predictor.

Importing this package is cheap: torch, timm and ray come with the modules that need them.
"""
