"""CPU cost of the pretrained EfficientNet-Lite0 against the earlier random-init tiny ViT: training and embedding.

Question: what does starting from the bundled Lite0 (at the benchmarks' resolution) cost per image on CPU,
next to the 2-block ViT-tiny at 64 px that ``finetune_quality.py`` / ``cross_domain.py`` trained before?

Protocol
--------
- Models (the benchmarks' own, :func:`finetune_quality.model_config`): ``lite0`` at each ``--img-size``
  (weights loaded, stem + first ``--freeze-blocks`` stages frozen, BatchNorm statistics held, an
  ``--embedding-dim`` projection (1280, orthonormal start: the setting the quality benchmarks chose;
  :func:`visuray.models.weights.prepare_for_training`), and the baseline ``vit-tiny`` (2 blocks,
  8 px patches, random init, nothing frozen, 64-d) at 64 px.
- Training step: a P x K = 8 x 4 batch (32 images) forward, the multi-similarity loss (the finetune job's
  default, :func:`visuray.metric_learning.loop.build_loss`), backward, gradient clipping at 3, AdamW step
  (``finetune_param_groups``). Embedding: ``model.eval()`` under ``torch.no_grad()``, batches of 64.
  Inputs are random tensors already at the model's size: decoding and augmentation are left out (they
  are the same for both models and cheap next to the model on CPU).
- Each measurement: 2 untimed warm-up iterations, then iterations until ``--seconds`` have passed (at
  least 3); images/s = images / time. ``--rounds`` rounds, the models alternating within each round;
  reported: the median images/s per model and the median over rounds of each ratio to the ViT baseline
  of the same round. ``torch.set_num_threads(--threads)``; the load average is printed before and after.
- Run it under ``/work/shared/bin/quiet --`` (waits for a quiet machine, takes the timing lock).

Run:  /work/shared/bin/quiet -- python benchmarks/pretrained_cost.py [--img-size 160] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from finetune_quality import BACKBONES, K, P, load_note, model_config

BASELINE = "vit-tiny @ 64 px"
EMBED_BATCH = 64


def build(
    backbone: str, img_size: int, freeze_blocks: int, embedding_dim: int | None = None
) -> tuple[Any, Callable[[], None], Any]:
    """(model, one training step, an embedding batch) for one configuration of the benchmarks."""
    import torch

    from visuray.metric_learning.config import LossSection
    from visuray.metric_learning.loop import build_loss, finetune_param_groups
    from visuray.models.embedding import build_embedding_model
    from visuray.models.weights import prepare_for_training

    args = argparse.Namespace(
        backbone=backbone,
        img_size=img_size,
        depth=2,
        embedding_dim=embedding_dim or BACKBONES[backbone]["embedding_dim"],
        projection_init="orthonormal" if embedding_dim else "random",
    )
    cfg = model_config(args)
    torch.manual_seed(0)
    model = build_embedding_model(cfg)
    prepare_for_training(model.backbone, cfg.backbone, freeze_blocks=freeze_blocks)
    groups, _ = finetune_param_groups(model, 0.05, None)
    optimizer = torch.optim.AdamW(groups, lr=3e-4)
    loss_fn = build_loss(LossSection(name="multi_similarity"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(0)
    train_batch = torch.randn(P * K, 3, img_size, img_size, generator=generator)
    labels = torch.arange(P).repeat_interleave(K)
    embed_batch = torch.randn(EMBED_BATCH, 3, img_size, img_size, generator=generator)

    def train_step() -> None:
        model.train()
        loss = loss_fn(model(train_batch), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 3.0)
        optimizer.step()

    return model, train_step, embed_batch


def images_per_s(run: Callable[[], None], images: int, seconds: float) -> float:
    for _ in range(2):
        run()
    count, started = 0, time.perf_counter()
    while count < 3 or time.perf_counter() - started < seconds:
        run()
        count += 1
    return count * images / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--img-size", type=int, nargs="+", default=[160], help="Lite0 resolutions")
    parser.add_argument("--freeze-blocks", type=int, default=3)
    parser.add_argument(
        "--embedding-dim", type=int, default=1280, help="Lite0 projection width (orthonormal start)"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0, help="timed seconds per measurement")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="runs/bench/pretrained_cost.json")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    print(f"start; {load_note()}", flush=True)
    configs = {f"lite0 @ {s} px": ("lite0", s, args.freeze_blocks, args.embedding_dim) for s in args.img_size}
    configs[BASELINE] = ("vit-tiny", 64, 0)
    built = {name: build(*config) for name, config in configs.items()}
    for name, (model, _, _) in built.items():
        total = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"{name}: {total / 1e6:.2f} M parameters, {trainable / 1e6:.2f} M trained", flush=True)

    runs: dict[str, dict[str, list[float]]] = {name: {"train": [], "embed": []} for name in built}
    for r in range(args.rounds):
        for name, (model, train_step, embed_batch) in built.items():

            def embed_step(model: Any = model, batch: Any = embed_batch) -> None:
                model.eval()
                with torch.no_grad():
                    model(batch)

            runs[name]["train"].append(images_per_s(train_step, P * K, args.seconds))
            runs[name]["embed"].append(images_per_s(embed_step, EMBED_BATCH, args.seconds))
            print(
                f"round {r + 1} {name}: train {runs[name]['train'][-1]:.1f} img/s, "
                f"embed {runs[name]['embed'][-1]:.1f} img/s; {load_note()}",
                flush=True,
            )

    summary = {}
    for name, measured in runs.items():
        row: dict[str, Any] = {}
        for what, values in measured.items():
            ratios = [v / b for v, b in zip(values, runs[BASELINE][what], strict=True)]
            row[f"{what} img/s"] = round(statistics.median(values), 1)
            row[f"{what} x baseline"] = round(statistics.median(ratios), 3)
        summary[name] = row
    print(
        f"\n| model | train img/s (P x K = {P * K}) | x {BASELINE} | embed img/s (batch {EMBED_BATCH}) | x {BASELINE} |"
    )
    print("|---|---|---|---|---|")
    for name, row in summary.items():
        print(
            f"| {name} | {row['train img/s']:.1f} | {row['train x baseline']:.3f} | {row['embed img/s']:.1f} | "
            f"{row['embed x baseline']:.3f} |"
        )
    print(f"\nend; {load_note()}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "runs": runs, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
