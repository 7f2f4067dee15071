"""Composed retrieval: a query is a reference image plus a modifying text ("same, but in red").

Image tokens (timm ``forward_features``) and text tokens (a small transformer trained from scratch on a
tokenizer trained on the catalog's own text) are fused by MAAF or a residual attention fusion, or by one
of the baselines, into one query vector that is compared with the target images' embeddings.

- :mod:`~visuray.fusion.config`: the model's and the ``train_fusion`` job's configs (pydantic, no torch);
- :mod:`~visuray.fusion.image_encoder`, :mod:`~visuray.fusion.text_encoder`,
  :mod:`~visuray.fusion.tokenizer`, :mod:`~visuray.fusion.modules` (MAAF, residual fusion, baselines),
  :mod:`~visuray.fusion.losses`: the model;
- :mod:`~visuray.fusion.model`: building it, and its artifact (save, load, pretrained parts);
- :mod:`~visuray.fusion.datasets` and :mod:`~visuray.fusion.data`: templated composed queries from a
  catalog's real attributes, and what the job reads;
- :mod:`~visuray.fusion.metrics`, :mod:`~visuray.fusion.evaluate`: held-out evaluation;
- :mod:`~visuray.fusion.loop`, :mod:`~visuray.fusion.job`: the per-worker loop and the driver;
- :mod:`~visuray.fusion.html_report`: the model's HTML report;
- :mod:`~visuray.fusion.predict`: the predictor the Serve deployment and the index job load.
"""
