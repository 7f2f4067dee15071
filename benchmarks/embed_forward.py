"""Images per second of the embedder that Serve and the index job run, against the default eager forward.

Question: how fast does ``EmbeddingEnsemble.embed`` (what the Serve embedder deployment and the
``build_index`` actors call) turn photos into vectors on CPU, against the plain way of running the same
model, and at which batch sizes? The embeddings must not change.

Protocol
--------
- Model: the bundled ImageNet EfficientNet-Lite0 published as a zero-shot model at 224 px (its weights'
  own size; ``visuray import-weights``: pooled features, 1280-d), loaded as a one-member ensemble.
- Images: the 20 bundled query photos (clothing-small, 160 px JPEGs), decoded once, cycled to fill each
  batch. Every variant includes the same preprocessing (:func:`visuray.images.to_model_input`: resize to
  224, normalise) and returns unit vectors.
- Variants: ``eager`` (``model.eval()`` under ``torch.no_grad()``, tensors in the default memory format:
  what a user's own loop does), ``inference-mode`` (the embedder before this benchmark: ``inference_mode``,
  default memory format) and ``served`` (``EmbeddingEnsemble`` as shipped: ``inference_mode`` and
  channels-last weights and inputs).
- Each measurement: 2 untimed warm-up calls, then calls until ``--seconds`` have passed (at least 3);
  images/s = images / time. ``--rounds`` rounds, the variants alternating within each round, at every
  batch size of ``--batch-sizes``; reported: the median images/s per variant and batch size, and the
  median over rounds of each variant's ratio to ``eager`` at the same batch size.
- Agreement: the largest absolute difference between ``served`` and ``eager`` vectors over all images.
- ``torch.set_num_threads(--threads)`` (2: the CPU machine's cores); run it under
  ``/work/shared/bin/quiet --`` (waits for a quiet machine, takes the timing lock).

Run:  /work/shared/bin/quiet -- python benchmarks/embed_forward.py [--rounds 3] [--seconds 4]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

VARIANTS = ("eager", "inference-mode", "served")


def lite0_ensembles(folder: str, img_size: int) -> dict[str, Any]:
    """The zero-shot Lite0 model published under ``folder``, loaded once per memory format."""
    from visuray.index.ensemble import EmbeddingEnsemble, EnsembleMember, EnsembleSpec
    from visuray.models.config import BackboneConfig
    from visuray.models.weights import check_pretrained, import_weights

    backbone = BackboneConfig(name="tf_efficientnet_lite0", weights="efficientnet_lite0", img_size=img_size)
    import_weights(folder, check_pretrained(backbone))
    spec = EnsembleSpec(members=[EnsembleMember(uri=folder)])
    return {
        "contiguous": EmbeddingEnsemble.load(spec, memory_format="contiguous"),
        "channels_last": EmbeddingEnsemble.load(spec),
    }


def eager_embed(ensemble: Any) -> Callable[[Sequence[Any]], np.ndarray]:
    """The plain forward of the ensemble's one model: ``no_grad``, default memory format, unit vectors."""
    import torch

    from visuray.images import to_model_input

    (model,) = ensemble.models

    def embed(images: Sequence[Any]) -> np.ndarray:
        with torch.no_grad():
            vectors = model(to_model_input(images, model.input_spec)).float().numpy()
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)

    return embed


def images_per_second(embed: Callable[[Sequence[Any]], Any], batch: Sequence[Any], seconds: float) -> float:
    for _ in range(2):
        embed(batch)
    calls, started = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - started < seconds:
        embed(batch)
        calls += 1
    return calls * len(batch) / (time.perf_counter() - started)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default=None, help="write the result as JSON here too")
    args = parser.parse_args(argv)

    import os

    import torch

    from visuray.catalog.sample import QUERY_NAME, bundled_query_dir
    from visuray.images import decode_image

    torch.set_num_threads(args.threads)
    photos = [decode_image(p.read_bytes()) for p in sorted(bundled_query_dir().glob("*/*.jpg"))]
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as folder:
        ensembles = lite0_ensembles(str(Path(folder) / "lite0"), args.img_size)
        embedders = {
            "eager": eager_embed(ensembles["contiguous"]),
            "inference-mode": ensembles["contiguous"].embed,
            "served": ensembles["channels_last"].embed,
        }
        difference = float(np.abs(embedders["served"](photos) - embedders["eager"](photos)).max())
        speeds: dict[int, dict[str, list[float]]] = {b: {v: [] for v in VARIANTS} for b in args.batch_sizes}
        for _ in range(args.rounds):
            for size in args.batch_sizes:
                batch = [photos[i % len(photos)] for i in range(size)]
                for variant in VARIANTS:
                    speeds[size][variant].append(images_per_second(embedders[variant], batch, args.seconds))
    table = {
        size: {
            **{f"{v} images/s": round(statistics.median(by[v]), 1) for v in VARIANTS},
            **{
                f"{v} / eager": round(
                    statistics.median(s / e for s, e in zip(by[v], by["eager"], strict=True)), 2
                )
                for v in VARIANTS[1:]
            },
        }
        for size, by in speeds.items()
    }
    result = {
        "model": f"tf_efficientnet_lite0 @ {args.img_size} px (bundled ImageNet weights, pooled 1280-d)",
        "sample": f"{len(photos)} bundled {QUERY_NAME} photos",
        "threads": args.threads,
        "rounds": args.rounds,
        "max |served - eager|": difference,
        "by batch size": table,
        "load average before, after": [load_before, os.getloadavg()[0]],
    }
    print(json.dumps(result, indent=2))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
