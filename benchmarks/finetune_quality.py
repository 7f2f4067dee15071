"""Retrieval quality of the metric objectives on fashion-products, at one CPU-sized training budget.

Protocol
--------
Data: the fashion-products catalog (studio photos with ``metadata.csv``), ingested with the project's
ingest job (label = ``articleType``, category = ``subCategory``, title = ``productDisplayName``).

- Split (class-disjoint): article types with at least ``--min-class`` photos, sorted by name; every
  other one (positions 0, 2, 4, ...) is a training class, the rest are held out. At most
  ``--per-class`` photos per training class are used (a subset, so that the whole benchmark fits the
  CPU budget); all photos of held-out classes are evaluated (capped at ``--per-class-eval``).
- (a) **class-disjoint retrieval**: leave-one-out over the held-out photos, a hit = same article type.
- (b) **product lines**: titles that are equal once colour words (every ``baseColour`` value) are removed
  form one product line ("Nike Men Blue Tee" / "Nike Men Red Tee"); leave-one-out over the held-out
  photos that belong to a line of two or more, a hit = same line. No training label ever names a line.
- Metrics: Recall@1 and MAP@R (:func:`visuray.evaluation.retrieval.retrieval_metrics`, chunked FAISS).
- Rows: raw pixels (16 x 16 RGB, centred, unit norm); the random-init network; the SSL checkpoint as is
  (``--ssl-model``, a pretrain job's model artifact; skipped when not given); and, all from random init
  (or from ``--ssl-model`` with ``--init-from-ssl``), the same budget for every trained row: triplet with
  batch-all, batch-hard and semi-hard mining, the adaptive triplet loss (title clusters within article
  types, batch-all mining) and multi-similarity. Budget: ViT-tiny with ``--depth`` blocks at ``--img-size``
  px, P x K = 8 x 4, ``--steps`` AdamW steps at lr ``--lr`` (warm-up 10 %, cosine decay), seed 0.
- Training runs in this process with the job's own pieces (:func:`visuray.metric_learning.loop.build_loss`,
  ``build_sampler``, ``training_labels``, ``finetune_param_groups``, ``lr_schedule``, ``train_transform``),
  without Ray and DeepSpeed: with one fp32 worker they change nothing numerically, and their start-up
  would cost more than the training at this budget.

Run:  python benchmarks/finetune_quality.py /work/shared/data/fashion-products [--steps 200] [--work runs/bench]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

NO_LABEL = -1
TRAINED_ROWS = {
    "triplet batch-all": {"name": "triplet", "miner": "batch_all"},
    "triplet batch-hard": {"name": "triplet", "miner": "batch_hard"},
    "triplet semi-hard": {"name": "triplet", "miner": "semi_hard"},
    "ATL (title clusters)": {"name": "adaptive_triplet", "miner": "batch_all", "margin": 0.1},
    "multi-similarity": {"name": "multi_similarity"},
}


# ---------------------------------------------------------------- data


def ingest_fashion_products(data: str, work: Path) -> str:
    """The catalog of ``data`` under ``work`` (ingested once, reused by later runs)."""
    from visuray.catalog.ingest import IngestConfig, run_ingest
    from visuray.config import load_config

    catalog = work / "catalog-fashion-products"
    if not (catalog / "LATEST").exists():
        cfg = load_config(
            IngestConfig,
            Path(__file__).resolve().parent.parent / "jobs/configs/ingest_fashion_products.yaml",
            [f"source={data}", f"metadata_csv={Path(data) / 'metadata.csv'}", f"output={catalog}"],
        )
        run_ingest(cfg)
    return str(catalog)


@dataclass
class Subset:
    """Rows of the catalog that a role (training, evaluation) uses, with masked labels."""

    labels: list[int]  # NO_LABEL outside the subset
    titles: list[str | None]
    label_names: list[str]
    categories: list[int]


def eligible_classes(rows: Any, min_class: int) -> list[int]:
    """Article types with at least ``min_class`` photos, sorted by name."""
    counts = np.bincount([label for label in rows.labels if label >= 0], minlength=len(rows.label_names))
    return sorted(
        (c for c in range(len(counts)) if counts[c] >= min_class), key=lambda c: rows.label_names[c]
    )


def class_split(rows: Any, min_class: int) -> tuple[list[int], list[int]]:
    """(training classes, held-out classes): alternate article types sorted by name."""
    eligible = eligible_classes(rows, min_class)
    return eligible[0::2], eligible[1::2]


def capped_rows(labels: list[int], classes: list[int], per_class: int) -> np.ndarray:
    """The first ``per_class`` rows (catalog order) of each class in ``classes``."""
    taken: dict[int, int] = {}
    keep = []
    wanted = set(classes)
    for i, label in enumerate(labels):
        if label in wanted and taken.get(label, 0) < per_class:
            taken[label] = taken.get(label, 0) + 1
            keep.append(i)
    return np.asarray(keep)


def training_subset(rows: Any, keep: np.ndarray) -> Subset:
    mask = np.zeros(len(rows), dtype=bool)
    mask[keep] = True
    return Subset(
        labels=[label if m else NO_LABEL for label, m in zip(rows.labels, mask, strict=True)],
        titles=[title if m else None for title, m in zip(rows.titles, mask, strict=True)],
        label_names=rows.label_names,
        categories=[c if m else NO_LABEL for c, m in zip(rows.categories, mask, strict=True)],
    )


def product_line_rows(rows: Any, candidates: np.ndarray, max_items: int) -> tuple[np.ndarray, list[str]]:
    """Rows of ``candidates`` in product lines of two or more, and their line keys."""
    from visuray.metric_learning.weak_labels import product_line_keys

    colours = {str(a.get("baseColour")) for a in rows.attributes if a.get("baseColour")}
    keys = product_line_keys([rows.titles[i] for i in candidates], colours)
    sizes: dict[str, int] = {}
    for key in keys:
        sizes[key] = sizes.get(key, 0) + 1
    chosen = [(i, k) for i, k in zip(candidates, keys, strict=True) if k and sizes[k] >= 2][:max_items]
    # A cap may cut a line to one member: drop such leftovers so every query has a relevant item.
    counts: dict[str, int] = {}
    for _, k in chosen:
        counts[k] = counts.get(k, 0) + 1
    chosen = [(i, k) for i, k in chosen if counts[k] >= 2]
    return np.asarray([i for i, _ in chosen]), [k for _, k in chosen]


# ---------------------------------------------------------------- models


def model_config(img_size: int, depth: int) -> dict[str, Any]:
    return {
        "backbone": {"name": "vit_tiny_patch16_224", "img_size": img_size, "patch_size": 8, "depth": depth},
        "embedding_dim": 64,
    }


def train_in_process(catalog: str, rows: Any, subset: Subset, model_cfg: dict, loss: dict, args: Any) -> Any:
    """Train with the finetune job's pieces in this process (see the module docstring); returns the model."""
    import torch
    from torch.utils.data import DataLoader

    from visuray.catalog.torch_dataset import CatalogTorchDataset
    from visuray.checkpoint import load_backbone_weights
    from visuray.metric_learning.config import FinetuneConfig
    from visuray.metric_learning.data import build_sampler, endless_batches, train_transform, training_labels
    from visuray.metric_learning.loop import build_loss, finetune_param_groups, set_learning_rates
    from visuray.models.embedding import build_embedding_model
    from visuray.train.schedules import lr_schedule

    cfg = FinetuneConfig.model_validate(
        {
            "catalog": catalog,
            "output": "unused",
            "init_from": args.ssl_model if args.init_from_ssl else None,
            "model": model_cfg,
            "train": {
                "steps": args.steps,
                "p": 8,
                "k": 4,
                "lr": args.lr,
                "warmup_steps": max(1, args.steps // 10),
            },
            "loss": loss,
            "weak_labels": {"target_size": 16, "min_size": 4},
        }
    )
    tc = cfg.train
    labels = training_labels(subset, cfg)
    dataset = CatalogTorchDataset(
        catalog, transform=train_transform(cfg.model.backbone.img_size), as_tuple=True
    )
    dataset.labels = labels.labels
    sampler = build_sampler(labels, tc, rank=0, world_size=1)
    batches = endless_batches(DataLoader(dataset, batch_sampler=sampler), sampler, 0)
    torch.manual_seed(tc.seed)
    model = build_embedding_model(cfg.model)
    if cfg.init_from:
        load_backbone_weights(model.backbone, cfg.init_from)
    groups, info = finetune_param_groups(model, tc.weight_decay, tc.layer_decay)
    optimizer = torch.optim.AdamW(groups, lr=tc.lr)
    loss_fn = build_loss(cfg.loss, labels.semantic_distances)
    schedule = lr_schedule(tc.lr, tc.min_lr, tc.steps, tc.warmup_steps)
    model.train()
    for step in range(tc.steps):
        images, batch_labels = next(batches)
        set_learning_rates(optimizer.param_groups, info, schedule[step], backbone_frozen=False)
        value = loss_fn(model(images), batch_labels)
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.clip_grad_norm)
        optimizer.step()
    return model.eval()


def embed(model: Any, images: list[bytes], img_size: int) -> np.ndarray:
    from visuray.evaluation.baselines import embed_images_in_process

    return embed_images_in_process(images, model, img_size, batch=128)


def random_init_model(model_cfg: dict) -> Any:
    import torch

    from visuray.models.config import EmbeddingModelConfig
    from visuray.models.embedding import build_embedding_model

    torch.manual_seed(0)
    return build_embedding_model(EmbeddingModelConfig.model_validate(model_cfg)).eval()


def baseline_embedders(model_cfg: dict, args: Any) -> dict[str, Any]:
    """name -> function(images) -> vectors, for the rows that need no training."""
    from visuray.evaluation.baselines import raw_pixel_embedding

    img_size = model_cfg["backbone"]["img_size"]
    out: dict[str, Any] = {
        "raw pixels (16x16 RGB)": raw_pixel_embedding,
        "random init": lambda images: embed(random_init_model(model_cfg), images, img_size),
    }
    if args.ssl_model:
        from visuray.models.embedding import load_embedding_model

        ssl, artifact = load_embedding_model(args.ssl_model)
        out["SSL only (DINO)"] = lambda images: embed(
            ssl, images, int(artifact.manifest.metadata["img_size"])
        )
    return out


def metrics_row(vectors: np.ndarray, labels: list[Any]) -> dict[str, float]:
    from visuray.evaluation.retrieval import retrieval_metrics

    m = retrieval_metrics(vectors, labels, ks=(1, 5, 10))
    return {"recall@1": round(m["recall@1"], 4), "map@r": round(m["map@r"], 4)}


def print_table(title: str, rows: list[dict[str, Any]], columns: list[str]) -> None:
    print(f"\n{title}")
    print(f"{'embedding':<26}" + "".join(f"{c:>18}" for c in columns))
    for row in rows:
        print(f"{row['embedding']:<26}" + "".join(f"{row.get(c, float('nan')):>18.3f}" for c in columns))


# ---------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", help="the fashion-products folder (images/ and metadata.csv)")
    parser.add_argument("--work", default="runs/bench", help="where the ingested catalog and results go")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument(
        "--min-class", type=int, default=20, help="article types with fewer photos are left out"
    )
    parser.add_argument("--per-class", type=int, default=40, help="training photos per training class")
    parser.add_argument("--per-class-eval", type=int, default=60, help="evaluated photos per held-out class")
    parser.add_argument("--max-line-items", type=int, default=1500, help="product-line photos evaluated")
    parser.add_argument("--ssl-model", default=None, help="a pretrain job's model artifact (SSL row)")
    parser.add_argument("--init-from-ssl", action="store_true", help="trained rows start from --ssl-model")
    parser.add_argument("--rows", nargs="*", default=list(TRAINED_ROWS), help="trained rows to run")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch

    from visuray.catalog.readers import CatalogRows

    torch.set_num_threads(args.threads)
    started = time.monotonic()
    work = Path(args.work).absolute()
    work.mkdir(parents=True, exist_ok=True)
    catalog = ingest_fashion_products(args.data, work)
    rows = CatalogRows(catalog)
    train_classes, test_classes = class_split(rows, args.min_class)
    train_rows = capped_rows(rows.labels, train_classes, args.per_class)
    eval_rows = capped_rows(rows.labels, test_classes, args.per_class_eval)
    all_test_rows = capped_rows(rows.labels, test_classes, len(rows))
    line_rows, line_keys = product_line_rows(rows, all_test_rows, args.max_line_items)
    print(
        f"{len(train_classes)} training classes ({len(train_rows)} photos), {len(test_classes)} held-out "
        f"classes ({len(eval_rows)} photos evaluated); {len(line_rows)} photos in "
        f"{len(set(line_keys))} product lines"
    )
    eval_images = [rows.image_bytes(i) for i in eval_rows]
    eval_labels = [rows.labels[i] for i in eval_rows]
    line_images = [rows.image_bytes(i) for i in line_rows]
    model_cfg = model_config(args.img_size, args.depth)

    results = []
    for name, embedder in baseline_embedders(model_cfg, args).items():
        results.append(
            {"embedding": name, **evaluate(embedder, eval_images, eval_labels, line_images, line_keys)}
        )
        print(results[-1], flush=True)
    subset = training_subset(rows, train_rows)
    for name in args.rows:
        t0 = time.monotonic()
        model = train_in_process(catalog, rows, subset, model_cfg, TRAINED_ROWS[name], args)
        embedder = lambda images, m=model: embed(m, images, args.img_size)  # noqa: E731
        row = {"embedding": name, **evaluate(embedder, eval_images, eval_labels, line_images, line_keys)}
        row["train_s"] = round(time.monotonic() - t0, 1)
        results.append(row)
        print(row, flush=True)

    columns = ["(a) recall@1", "(a) map@r", "(b) recall@1", "(b) map@r"]
    print_table(
        f"fashion-products, {args.steps} steps, {args.img_size} px, depth {args.depth}", results, columns
    )
    print(f"\ntotal wall time {time.monotonic() - started:.0f} s")
    (work / "finetune_quality.json").write_text(json.dumps({"args": vars(args), "rows": results}, indent=1))


def evaluate(embedder: Any, eval_images, eval_labels, line_images, line_keys) -> dict[str, float]:  # noqa: ANN001
    a = metrics_row(embedder(eval_images), eval_labels)
    b = metrics_row(embedder(line_images), line_keys)
    return {
        "(a) recall@1": a["recall@1"],
        "(a) map@r": a["map@r"],
        "(b) recall@1": b["recall@1"],
        "(b) map@r": b["map@r"],
    }


if __name__ == "__main__":
    main()
