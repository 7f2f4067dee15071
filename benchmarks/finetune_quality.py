"""Retrieval quality of a pretrained backbone, as is and fine-tuned, on classes of fashion-products it never saw.

Protocol
--------
Data: the fashion-products catalog (studio photos with ``metadata.csv``), ingested with the project's
ingest job (label = ``articleType``, category = ``subCategory``, title = ``productDisplayName``).

- Split (class-disjoint): article types with at least ``--min-class`` photos, sorted by name; every
  other one (positions 0, 2, 4, ...) is a training class, the rest are held out: **the held-out classes
  are the test set**. At most ``--per-class`` photos per training class are used (a subset, so that the
  whole benchmark fits the CPU budget); all photos of held-out classes are evaluated (capped at
  ``--per-class-eval``).
- ``--validate``: the same protocol inside the training classes only (they are split again by the same
  rule: positions 0, 2, 4, ... of the sorted training classes train, the others are the validation
  classes), for choosing settings without looking at the held-out classes.
- (a) **class-disjoint retrieval**: leave-one-out over the held-out photos, a hit = same article type.
- (b) **product lines**: titles that are equal once colour words (every ``baseColour`` value) are removed
  form one product line ("Nike Men Blue Tee" / "Nike Men Red Tee"); leave-one-out over the held-out
  photos that belong to a line of two or more, a hit = same line. No training label ever names a line.
- Metrics: Recall@1 and MAP@R, per query (:func:`per_query_metrics`, brute force over the similarity
  matrix), their means checked against :func:`visuray.evaluation.retrieval.retrieval_metrics` (chunked
  FAISS) for every row. Each trained row's margin over each other row comes with a paired 95% interval:
  a bootstrap over queries (``N_BOOT`` resamples, seed ``BOOT_SEED``), both rows scored on the same
  resample.
- Backbones (``--backbone``): ``lite0`` (default): ``tf_efficientnet_lite0`` from the bundled ImageNet
  weights (``efficientnet_lite0``), fed with the weights' own mean/std (recorded by
  :func:`visuray.models.weights.check_pretrained`), an ``--embedding-dim`` (default 128) linear
  projection started as ``--projection-init`` says, BatchNorm statistics held (``batchnorm_statistics:
  auto``), stem + first ``--freeze-blocks`` stages frozen. ``vit-tiny``: the
  earlier protocol, a ViT-tiny with ``--depth`` blocks and 8 px patches from random init (weights None),
  64-d, no frozen blocks.
- Rows: raw pixels (16 x 16 RGB, centred, unit norm); random init (the same architecture, weights None,
  seed 0, BatchNorm statistics as initialised); pretrained as is (``pooled_feature_model`` +
  ``load_pretrained``: the L2-normalised pooled features, no training; ``lite0`` only); the SSL
  checkpoint as is (``--ssl-model``, a pretrain job's model artifact; skipped when not given); and the
  trained rows (``--rows``; default: multi-similarity, the finetune job's default objective; triplet
  with batch-all / batch-hard / semi-hard mining, ATL, and multi-similarity and ATL with category-favouring
  batches, ``train.single_category_prob`` 0.5, stay available), from the backbone's starting
  weights (or from ``--ssl-model`` with ``--init-from-ssl``). Every trained row gets the same budget:
  ``--steps`` AdamW steps at peak lr ``--lr`` (warm-up 10 %, cosine decay to 1e-6, weight decay 0.05,
  gradient norm clipped at 3), P x K = 8 x 4, ``--img-size`` px, ``--freeze-blocks``, ``--seed``; its
  wall-clock training time and the load average are recorded beside it.
- Training runs in this process with the job's own pieces (:func:`visuray.metric_learning.job.with_checked_weights`,
  ``build_loss``, ``build_sampler``, ``training_labels``, ``finetune_param_groups``, ``train_transform``,
  :func:`visuray.models.weights.prepare_for_training`, :func:`visuray.train.schedules.lr_schedule`),
  without Ray and DeepSpeed: with one fp32 worker they change nothing numerically, and their start-up
  would cost more than the training at this budget.

Settings (``benchmarks/README.md``): ``lite0`` at 160 px, 300 steps (about 3 min a trained row on two
idle cores), 3 frozen blocks, ``--per-class 400``, a 1280-d projection started orthonormal
(``--projection-init orthonormal``: the identity at full width, so training starts from exactly the
pretrained ranking), **lr 3e-5**: chosen with ``--validate`` among lr 1e-3 ... 3e-6, frozen blocks
3 / 5 / 6, 100 / 300 steps, a projection-only warm-up (``--freeze-backbone-steps``), layer decay,
128 / 512 / 1280-d, random / orthonormal projection starts and 40 / 400 photos per class (never on the
held-out classes), then the test protocol run once. ``--lr`` keeps the finetune job's default, 3e-4,
which the validation split ranked far lower.

Run:  python benchmarks/finetune_quality.py /work/shared/data/fashion-products --lr 3e-5 --embedding-dim 1280 \
          --projection-init orthonormal --per-class 400 [--validate] [--work runs/bench]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from torch import nn

    from visuray.models.config import BackboneConfig, EmbeddingModelConfig

NO_LABEL = -1
# Each trained row: the finetune job's ``loss`` section, and what it sets in ``train`` beyond the budget.
CATEGORY_BATCHES = {"single_category_prob": 0.5}  # the share the job's field description suggests
TRAINED_ROWS: dict[str, dict[str, Any]] = {
    "multi-similarity": {"loss": {"name": "multi_similarity"}},
    "multi-similarity, category batches": {"loss": {"name": "multi_similarity"}, "train": CATEGORY_BATCHES},
    "triplet batch-all": {"loss": {"name": "triplet", "miner": "batch_all"}},
    "triplet batch-hard": {"loss": {"name": "triplet", "miner": "batch_hard"}},
    "triplet semi-hard": {"loss": {"name": "triplet", "miner": "semi_hard"}},
    "ATL (title clusters)": {"loss": {"name": "adaptive_triplet", "miner": "batch_all", "margin": 0.1}},
    "ATL (title clusters), category batches": {
        "loss": {"name": "adaptive_triplet", "miner": "batch_all", "margin": 0.1},
        "train": CATEGORY_BATCHES,
    },
}
DEFAULT_ROWS = ["multi-similarity"]  # the finetune job's default objective
# Per backbone: the defaults of the arguments left unset on the command line.
BACKBONES: dict[str, dict[str, Any]] = {
    "lite0": {"img_size": 160, "lr": 3e-4, "freeze_blocks": 3, "steps": 300, "embedding_dim": 128},
    "vit-tiny": {"img_size": 64, "lr": 1e-3, "freeze_blocks": 0, "steps": 200, "embedding_dim": 64},
}
P, K = 8, 4
N_BOOT, BOOT_SEED = 2000, 0
NEAR_TIE = 1e-5  # inner products of unit vectors closer than this may swap between summation orders
RAW_PIXELS = "raw pixels (16x16 RGB)"

Embedder = Callable[[list[bytes]], np.ndarray]


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


def alternate(classes: list[int]) -> tuple[list[int], list[int]]:
    """(positions 0, 2, 4, ..., positions 1, 3, 5, ...) of ``classes``."""
    return classes[0::2], classes[1::2]


def class_split(rows: Any, min_class: int, validate: bool = False) -> tuple[list[int], list[int]]:
    """(training classes, held-out classes): alternate article types sorted by name. With ``validate``
    the training classes alone, split again the same way: (inner training, validation classes)."""
    train, test = alternate(eligible_classes(rows, min_class))
    return alternate(train) if validate else (train, test)


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


def protocol_arguments(parser: argparse.ArgumentParser) -> None:
    """The backbone, budget and row arguments both benchmarks take (defaults per backbone: BACKBONES)."""
    parser.add_argument("--backbone", choices=list(BACKBONES), default="lite0")
    parser.add_argument("--steps", type=int, default=None, help="AdamW steps of every trained row")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate")
    parser.add_argument("--img-size", type=int, default=None)
    parser.add_argument("--freeze-blocks", type=int, default=None, help="stem + first N stages frozen")
    parser.add_argument("--depth", type=int, default=2, help="ViT blocks (vit-tiny only)")
    parser.add_argument(
        "--freeze-backbone-steps",
        type=int,
        default=0,
        help="train.freeze_backbone_steps: only the projection learns for the first N steps (then all)",
    )
    parser.add_argument("--layer-decay", type=float, default=None, help="train.layer_decay (None: one lr)")
    parser.add_argument("--embedding-dim", type=int, default=None, help="model.embedding_dim")
    parser.add_argument(
        "--projection-init", choices=["random", "orthonormal"], default="random", help="model.projection_init"
    )
    parser.add_argument("--ssl-model", default=None, help="a pretrain job's model artifact (SSL row)")
    parser.add_argument("--init-from-ssl", action="store_true", help="trained rows start from --ssl-model")
    parser.add_argument(
        "--rows", nargs="*", default=DEFAULT_ROWS, choices=list(TRAINED_ROWS), help="trained rows to run"
    )
    parser.add_argument(
        "--baselines",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the untrained rows (--no-baselines: trained rows only, e.g. while tuning)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="train.seed of every trained row (initialisation, batches)"
    )
    parser.add_argument("--threads", type=int, default=2)


def with_backbone_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """``args`` with every budget argument left unset taken from ``BACKBONES[args.backbone]``."""
    for key, value in BACKBONES[args.backbone].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


def backbone_config(backbone: str, img_size: int, depth: int = 2) -> BackboneConfig:
    """The starting backbone of ``--backbone`` (weights not yet checked: see :func:`model_config`)."""
    from visuray.models.config import BackboneConfig

    if backbone == "lite0":
        return BackboneConfig(name="tf_efficientnet_lite0", weights="efficientnet_lite0", img_size=img_size)
    return BackboneConfig(
        name="vit_tiny_patch16_224", weights=None, img_size=img_size, patch_size=8, depth=depth
    )


def model_config(args: argparse.Namespace) -> EmbeddingModelConfig:
    """The embedding model of the run, its weights checked and their mean/std recorded (as the job's driver
    does before any worker starts)."""
    from visuray.models.config import EmbeddingModelConfig
    from visuray.models.weights import check_pretrained

    backbone = check_pretrained(backbone_config(args.backbone, args.img_size, args.depth))
    return EmbeddingModelConfig(
        backbone=backbone, embedding_dim=args.embedding_dim, projection_init=args.projection_init
    )


def describe_budget(args: argparse.Namespace, model_cfg: EmbeddingModelConfig) -> str:
    bb = model_cfg.backbone
    arch = f"{bb.name}" + (f" depth {bb.depth}, patch {bb.patch_size}" if bb.depth else "")
    return (
        f"{arch}, {args.steps} steps, {args.img_size} px, P x K = {P} x {K}, lr {args.lr:g}, "
        f"{args.freeze_blocks} frozen blocks, {model_cfg.embedding_dim}-d"
        + (" (orthonormal start)" if model_cfg.projection_init == "orthonormal" else "")
        + (f", head alone for {args.freeze_backbone_steps} steps" if args.freeze_backbone_steps else "")
        + (f", layer decay {args.layer_decay:g}" if args.layer_decay else "")
        + f", seed {args.seed}"
    )


def train_in_process(
    catalog: str,
    subset: Subset,
    model_cfg: EmbeddingModelConfig,
    row: dict[str, Any],
    args: argparse.Namespace,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train with the finetune job's pieces in this process (see the module docstring); returns the model
    and what the run cost (wall-clock seconds, load average)."""
    import torch
    from torch.utils.data import DataLoader

    from visuray.catalog.torch_dataset import CatalogTorchDataset
    from visuray.metric_learning.config import FinetuneConfig
    from visuray.metric_learning.data import build_sampler, endless_batches, train_transform, training_labels
    from visuray.metric_learning.job import with_checked_weights
    from visuray.metric_learning.loop import build_loss, finetune_param_groups, set_learning_rates
    from visuray.models.embedding import build_embedding_model
    from visuray.models.weights import prepare_for_training
    from visuray.train.schedules import lr_schedule

    started, load_before = time.monotonic(), os.getloadavg()[0]
    cfg = FinetuneConfig.model_validate(
        {
            "catalog": catalog,
            "output": "unused",
            "init_from": args.ssl_model if args.init_from_ssl else None,
            "model": model_cfg.model_dump(mode="json"),
            "train": {
                "steps": args.steps,
                "p": P,
                "k": K,
                "lr": args.lr,
                "warmup_steps": max(1, args.steps // 10),
                "freeze_blocks": args.freeze_blocks,
                "freeze_backbone_steps": args.freeze_backbone_steps,
                "layer_decay": args.layer_decay,
                "seed": args.seed,
            }
            | row.get("train", {}),
            "loss": row["loss"],
            "weak_labels": {"target_size": 16, "min_size": 4},
        }
    )
    cfg = with_checked_weights(cfg)  # init_from (--init-from-ssl) becomes the backbone's weights here
    tc = cfg.train
    labels = training_labels(subset, cfg)
    dataset = CatalogTorchDataset(
        catalog, transform=train_transform(cfg.model.backbone.input_spec), as_tuple=True
    )
    dataset.labels = labels.labels
    sampler = build_sampler(labels, tc, rank=0, world_size=1)
    batches = endless_batches(DataLoader(dataset, batch_sampler=sampler), sampler, 0)
    torch.manual_seed(tc.seed)
    model = build_embedding_model(cfg.model)
    prepare_for_training(model.backbone, cfg.model.backbone, freeze_blocks=tc.freeze_blocks)
    groups, info = finetune_param_groups(model, tc.weight_decay, tc.layer_decay)
    optimizer = torch.optim.AdamW(groups, lr=tc.lr)
    loss_fn = build_loss(cfg.loss, labels.semantic_distances)
    schedule = lr_schedule(tc.lr, tc.min_lr, tc.steps, tc.warmup_steps)
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.train()  # BatchNorm layers held by prepare_for_training stay in eval mode
    losses = []
    for step in range(tc.steps):
        images, batch_labels = next(batches)
        frozen = step < tc.freeze_backbone_steps
        set_learning_rates(optimizer.param_groups, info, schedule[step], backbone_frozen=frozen)
        value = loss_fn(model(images), batch_labels)
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        if tc.clip_grad_norm:
            torch.nn.utils.clip_grad_norm_(trainable, tc.clip_grad_norm)
        optimizer.step()
        losses.append(float(value.detach()))
        if (step + 1) % 50 == 0:
            print(f"  step {step + 1}/{tc.steps} loss {np.mean(losses[-50:]):.4f}", flush=True)
    cost = {
        "train_s": round(time.monotonic() - started, 1),
        "load_avg": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "final_loss": round(float(np.mean(losses[-20:])), 4),
        "trainable_params": sum(p.numel() for p in trainable),
    }
    return model.eval(), cost


def embed(model: nn.Module, images: list[bytes]) -> np.ndarray:
    """``images`` through ``model``, fed as the model expects (its recorded input size, mean and std)."""
    from visuray.evaluation.baselines import embed_images_in_process

    return embed_images_in_process(images, model, model.input_spec, batch=128)


def random_init_model(model_cfg: EmbeddingModelConfig) -> nn.Module:
    """The run's architecture with no weights loaded (seed 0), fed like the pretrained one."""
    import torch

    from visuray.models.embedding import build_embedding_model

    random_cfg = model_cfg.model_copy(
        update={"backbone": model_cfg.backbone.model_copy(update={"weights": None})}
    )
    torch.manual_seed(0)
    return build_embedding_model(random_cfg).eval()


def pretrained_as_is_model(backbone: BackboneConfig) -> nn.Module:
    """The starting weights' L2-normalised pooled features (identity projection), no training."""
    from visuray.models.embedding import pooled_feature_model
    from visuray.models.weights import load_pretrained

    model, _ = pooled_feature_model(backbone)
    load_pretrained(model.backbone, backbone)
    return model.eval()


def baseline_embedders(model_cfg: EmbeddingModelConfig, args: argparse.Namespace) -> dict[str, Embedder]:
    """name -> function(images) -> vectors, for the rows that need no training."""
    from visuray.evaluation.baselines import raw_pixel_embedding

    if not args.baselines:
        return {}
    random_model = random_init_model(model_cfg)
    out: dict[str, Embedder] = {
        RAW_PIXELS: raw_pixel_embedding,
        "random init (seed 0)": lambda images: embed(random_model, images),
    }
    if model_cfg.backbone.weights is not None:
        pretrained = pretrained_as_is_model(model_cfg.backbone)
        out["pretrained as is (pooled)"] = lambda images: embed(pretrained, images)
    if args.ssl_model:
        from visuray.models.embedding import load_embedding_model

        ssl, _ = load_embedding_model(args.ssl_model)
        out["SSL only (DINO)"] = lambda images: embed(ssl, images)
    return out


def trained_row_name(name: str, model_cfg: EmbeddingModelConfig, args: argparse.Namespace) -> str:
    if args.init_from_ssl:
        return f"SSL + {name}"
    return f"{'pretrained' if model_cfg.backbone.weights else 'random init'} + {name}"


def evaluate_rows(
    catalog: str,
    subset: Subset,
    model_cfg: EmbeddingModelConfig,
    args: argparse.Namespace,
    evaluate: Callable[[str, Embedder], dict[str, Any]],
) -> tuple[list[dict[str, Any]], list[str]]:
    """Every row of a benchmark, each scored by ``evaluate(name, embedder)``: the baselines, then each of
    ``args.rows`` trained on ``subset`` with the same budget (its training cost joined to its row).
    Returns the rows and the trained rows' names."""
    results = []
    for name, embedder in baseline_embedders(model_cfg, args).items():
        results.append(evaluate(name, embedder))
        print(results[-1], flush=True)
    trained = []
    for key in args.rows:
        name = trained_row_name(key, model_cfg, args)
        model, cost = train_in_process(catalog, subset, model_cfg, TRAINED_ROWS[key], args)
        results.append(evaluate(name, lambda images, m=model: embed(m, images)) | cost)
        trained.append(name)
        print(results[-1], flush=True)
    return results, trained


# ---------------------------------------------------------------- metrics


def per_query_metrics(
    query: np.ndarray,
    query_labels: Sequence[Any],
    gallery: np.ndarray | None = None,
    gallery_labels: Sequence[Any] | None = None,
) -> dict[str, np.ndarray]:
    """Each query's hit@1 (0/1) and AP@R (NaN where it has no relevant gallery item), by brute force over
    the full inner-product similarity matrix; leave-one-out when ``gallery`` is None.

    The definitions of :func:`visuray.evaluation.retrieval.retrieval_metrics`: R = the number of gallery
    items with the query's label (the query itself excluded in leave-one-out), AP@R = 1/R * sum over the
    top R of precision@i * rel(i). Recall@1 is the mean hit@1 over all queries, MAP@R the mean AP@R over
    the queries that have an R. Equal scores are ranked by gallery position (a stable sort).

    Also returned: ``near_tie@1`` / ``near_tie@r``, whether a relevant and an irrelevant item next to each
    other in the ranking (at rank 1, or within the top R + 1) score within ``NEAR_TIE`` of each other, so
    that another summation order of the same inner products (FAISS's) may swap them."""
    leave_one_out = gallery is None
    if leave_one_out:
        gallery, gallery_labels = query, query_labels
    assert gallery is not None and gallery_labels is not None
    vocab: dict[Any, int] = {}
    q_codes = np.array([vocab.setdefault(x, len(vocab)) for x in query_labels], dtype=np.int64)
    g_codes = np.array([vocab.setdefault(x, len(vocab)) for x in gallery_labels], dtype=np.int64)
    sim = np.asarray(query, dtype=np.float32) @ np.asarray(gallery, dtype=np.float32).T
    if leave_one_out:
        np.fill_diagonal(sim, -np.inf)
    order = np.argsort(-sim, axis=1, kind="stable")
    if leave_one_out:
        order = order[:, :-1]  # the query itself, ranked last
    rel = g_codes[order] == q_codes[:, None]
    relevant = rel.sum(axis=1)
    ranks = np.arange(1, rel.shape[1] + 1)
    precision = np.cumsum(rel, axis=1) / ranks
    within_r = ranks[None, :] <= relevant[:, None]
    ap = (precision * rel * within_r).sum(axis=1) / np.maximum(relevant, 1)
    scores = np.take_along_axis(sim, order, axis=1)
    swappable = (scores[:, :-1] - scores[:, 1:] < NEAR_TIE) & (rel[:, :-1] != rel[:, 1:])
    return {
        "hit@1": rel[:, 0].astype(np.float64),
        "ap@r": np.where(relevant > 0, ap, np.nan),
        "near_tie@1": swappable[:, 0] if swappable.shape[1] else np.zeros(len(rel), dtype=bool),
        "near_tie@r": (swappable & within_r[:, :-1]).any(axis=1),
    }


def means(per_query: dict[str, np.ndarray]) -> dict[str, float]:
    """Recall@1 and MAP@R from :func:`per_query_metrics`' values."""
    return {"recall@1": float(per_query["hit@1"].mean()), "map@r": float(np.nanmean(per_query["ap@r"]))}


def check_against_library(per_query: dict[str, np.ndarray], library: dict[str, float], what: str) -> float:
    """The per-query means must be ``retrieval_metrics``' Recall@1 and MAP@R; returns the larger difference.

    Equal except where scores tie within float32 rounding: FAISS and numpy sum the inner products in
    another order, so near-equal neighbours may swap (a random-init network's similarities all lie within
    ~0.02 of 1). Each query with such a near tie (``near_tie@1`` / ``near_tie@r``) may move the mean by up
    to 1 / n; any difference beyond that (and 1e-6) is an error."""
    mine = means(per_query)
    n, n_ap = len(per_query["hit@1"]), int(np.isfinite(per_query["ap@r"]).sum())
    allowed = {
        "recall@1": 1e-6 + per_query["near_tie@1"].sum() / n,
        "map@r": 1e-6 + (per_query["near_tie@r"] & np.isfinite(per_query["ap@r"])).sum() / max(n_ap, 1),
    }
    diffs = {key: abs(mine[key] - library[key]) for key in allowed}
    for key, diff in diffs.items():
        if diff > allowed[key]:
            raise RuntimeError(
                f"{what}: per-query {key} {mine[key]:.6f} != retrieval_metrics {library[key]:.6f} "
                f"(near ties allow {allowed[key]:.1e})"
            )
    return max(diffs.values())


def score(
    vectors: np.ndarray,
    labels: Sequence[Any],
    gallery: np.ndarray | None = None,
    gallery_labels: Sequence[Any] | None = None,
    ks: tuple[int, ...] = (1,),
    what: str = "",
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """(``retrieval_metrics``' means, the per-query values), the two checked against each other."""
    from visuray.evaluation.retrieval import retrieval_metrics

    library = retrieval_metrics(vectors, labels, gallery, gallery_labels, ks=ks)
    per_query = per_query_metrics(vectors, labels, gallery, gallery_labels)
    library["check_diff"] = check_against_library(per_query, library, what)
    print(
        f"  {what}: per-query means vs retrieval_metrics, largest difference {library['check_diff']:.1e} "
        f"({int(per_query['near_tie@r'].sum())} queries with near ties)"
    )
    return library, per_query


def bootstrap_counts(n: int, n_boot: int = N_BOOT, seed: int = BOOT_SEED) -> np.ndarray:
    """(n_boot, n): how often each resample (n queries drawn with replacement) draws each query."""
    rng = np.random.default_rng(seed)
    return np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(n_boot)])


def paired_margin(a: np.ndarray, b: np.ndarray, counts: np.ndarray) -> dict[str, Any]:
    """mean(a - b) over the queries where both are defined, with the 2.5 and 97.5 percentiles of that
    mean over the resamples ``counts`` (:func:`bootstrap_counts`): each resample scores both rows on the
    same queries."""
    valid = ~(np.isnan(a) | np.isnan(b))
    diff = (a - b)[valid]
    drawn = counts[:, valid]
    boot = (drawn @ diff) / np.maximum(drawn.sum(axis=1), 1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {"margin": float(diff.mean()), "ci95": [float(lo), float(hi)]}


METRIC_KEYS = {"Recall@1": "hit@1", "MAP@R": "ap@r"}


def margins_over(
    per_query: dict[str, dict[str, np.ndarray]], trained: list[str], task: str = ""
) -> list[dict[str, Any]]:
    """Each trained row's margin over every other row (Recall@1 and MAP@R), paired 95% intervals; one
    resample set (seed ``BOOT_SEED``) for every pair and metric."""
    if not trained:
        return []
    n = len(next(iter(per_query.values()))["hit@1"])
    counts = bootstrap_counts(n)
    out = []
    for model in trained:
        for other in (name for name in per_query if name != model):
            row: dict[str, Any] = {"task": task, "model": model, "over": other}
            for metric, key in METRIC_KEYS.items():
                row[metric] = paired_margin(per_query[model][key], per_query[other][key], counts)
            out.append(row)
    return out


def cell(value: Any, column: str) -> str:
    if column == "train_s" and isinstance(value, int | float):
        return f"{value:.0f}"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def markdown_table(rows: list[dict[str, Any]], columns: list[str], first: str = "embedding") -> str:
    lines = [f"| {first} | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for row in rows:
        lines.append(f"| {row[first]} | " + " | ".join(cell(row.get(c, "-"), c) for c in columns) + " |")
    return "\n".join(lines)


def run_stem(name: str, args: argparse.Namespace) -> str:
    """The results' file name: the benchmark and its settings (runs with other settings keep theirs)."""
    return (
        f"{name}_{args.backbone}_{args.steps}steps_{args.img_size}px_lr{args.lr:g}_freeze{args.freeze_blocks}"
        + (f"_head{args.freeze_backbone_steps}" if args.freeze_backbone_steps else "")
        + (f"_ld{args.layer_decay:g}" if args.layer_decay else "")
        + ("_ortho" if args.projection_init == "orthonormal" else "")
        + ("_from-ssl" if args.init_from_ssl else "_with-ssl" if args.ssl_model else "")
        + (f"_seed{args.seed}" if args.seed else "")
        + (
            f"_{args.embedding_dim}d"
            if args.embedding_dim != BACKBONES[args.backbone]["embedding_dim"]
            else ""
        )
    )


def margins_markdown(margins: list[dict[str, Any]]) -> str:
    """margin [95% interval] of each trained row over each other row, a line per (task, pair)."""
    lines = ["| task | model | over | Recall@1 margin [95%] | MAP@R margin [95%] |", "|---|---|---|---|---|"]
    for m in margins:
        cells = [
            f"{m[k]['margin']:+.3f} [{m[k]['ci95'][0]:+.3f}, {m[k]['ci95'][1]:+.3f}]" for k in METRIC_KEYS
        ]
        lines.append(f"| {m['task']} | {m['model']} | {m['over']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def load_note() -> str:
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


# ---------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", help="the fashion-products folder (images/ and metadata.csv)")
    parser.add_argument("--work", default="runs/bench", help="where the ingested catalog and results go")
    parser.add_argument(
        "--validate", action="store_true", help="evaluate on a split of the training classes (tuning)"
    )
    parser.add_argument(
        "--min-class", type=int, default=20, help="article types with fewer photos are left out"
    )
    parser.add_argument("--per-class", type=int, default=40, help="training photos per training class")
    parser.add_argument("--per-class-eval", type=int, default=60, help="evaluated photos per held-out class")
    parser.add_argument("--max-line-items", type=int, default=1500, help="product-line photos evaluated")
    protocol_arguments(parser)
    args = with_backbone_defaults(parser.parse_args())

    import torch

    from visuray.catalog.readers import CatalogRows

    torch.set_num_threads(args.threads)
    started = time.monotonic()
    work = Path(args.work).absolute()
    work.mkdir(parents=True, exist_ok=True)
    catalog = ingest_fashion_products(args.data, work)
    rows = CatalogRows(catalog)
    train_classes, test_classes = class_split(rows, args.min_class, args.validate)
    train_rows = capped_rows(rows.labels, train_classes, args.per_class)
    eval_rows = capped_rows(rows.labels, test_classes, args.per_class_eval)
    all_test_rows = capped_rows(rows.labels, test_classes, len(rows))
    line_rows, line_keys = product_line_rows(rows, all_test_rows, args.max_line_items)
    role = "validation (inside the training classes)" if args.validate else "held-out (test)"
    print(
        f"{len(train_classes)} training classes ({len(train_rows)} photos), {len(test_classes)} {role} "
        f"classes ({len(eval_rows)} photos evaluated); {len(line_rows)} photos in "
        f"{len(set(line_keys))} product lines; {load_note()}"
    )
    print("test classes:", ", ".join(rows.label_names[c] for c in test_classes), flush=True)
    eval_images = [rows.image_bytes(i) for i in eval_rows]
    eval_labels = [rows.labels[i] for i in eval_rows]
    line_images = [rows.image_bytes(i) for i in line_rows]
    model_cfg = model_config(args)
    budget = describe_budget(args, model_cfg)
    print(budget, flush=True)

    per_query: dict[str, dict[str, dict[str, np.ndarray]]] = {"(a)": {}, "(b)": {}}

    def evaluate(name: str, embedder: Embedder) -> dict[str, Any]:
        a, per_query["(a)"][name] = score(embedder(eval_images), eval_labels, what=f"{name} (a)")
        b, per_query["(b)"][name] = score(embedder(line_images), line_keys, what=f"{name} (b)")
        row = {"embedding": name}
        for task, m in (("(a)", a), ("(b)", b)):
            row |= {f"{task} Recall@1": round(m["recall@1"], 4), f"{task} MAP@R": round(m["map@r"], 4)}
        return row

    results, trained = evaluate_rows(catalog, training_subset(rows, train_rows), model_cfg, args, evaluate)

    margins = [m for task in per_query for m in margins_over(per_query[task], trained, task)]
    columns = ["(a) Recall@1", "(a) MAP@R", "(b) Recall@1", "(b) MAP@R", "train_s"]
    print(f"\nfashion-products, {role} classes; {budget}\n")
    print(markdown_table(results, columns))
    print(f"\nmargins, paired bootstrap over queries ({N_BOOT} resamples, seed {BOOT_SEED})\n")
    print(margins_markdown(margins))
    print(f"\ntotal wall time {time.monotonic() - started:.0f} s; {load_note()}")
    stem = run_stem("finetune_quality" + ("_validate" if args.validate else ""), args)
    (work / f"{stem}.json").write_text(
        json.dumps({"args": vars(args), "budget": budget, "rows": results, "margins": margins}, indent=1)
    )
    np.savez(
        work / f"{stem}_per_query.npz",
        **{f"{task} {name} {key}": v for task in per_query for name, d in per_query[task].items() for key, v in d.items()},
    )  # fmt: skip


if __name__ == "__main__":
    main()
