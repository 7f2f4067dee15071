"""Quality of DINO pretraining on fashion-products: k-NN and few-shot accuracy on held-out article types,
pretrained backbone against the same backbone at random initialisation.

Protocol
--------
Data: the fashion-products catalog (9,583 studio photos; label = ``articleType``), ingested with
``jobs/configs/ingest_fashion_products.yaml``.

- Pretraining (not run here): the ``pretrain`` job ``jobs/configs/pretrain_fashion_products.yaml`` on
  **all** catalog images with labels unused, as the issue asks; this includes the held-out types' photos,
  unlabelled. CPU budget: timm ``resnet10t`` at 64 px, one Ray worker with 1 CPU (embedded local
  cluster), 200 steps of batch 32 x (2 x 64 px + 2 x 32 px crops), about 35 min wall on the shared,
  loaded 2-core machine (~3 img/s); the steps are read back from the model artifact's metadata.
- Split (class-disjoint): article types with at least ``--min-class`` (20) photos, sorted by name; the
  types at odd positions (1, 3, 5, ...) are held out (the same split as ``finetune_quality.py``). At most
  ``--per-class`` photos per held-out type are evaluated (a seeded random subset, so that the big types,
  1,361 Shirts, do not make k-NN a majority vote); evaluation never sees another type.
- Features: the backbone's pooled output (timm ``forward_head(pre_logits=True)``), L2-normalised, at the
  model's ``img_size`` with the serving preprocessing (resize shorter side, centre crop). Models in eval
  mode.
- k-NN: weighted k-NN (k=20, T=0.07, DINO's protocol) with a stratified 50/50 split of the *items* inside
  the held-out types (seed 0).
- Few-shot: 5-way 1-shot and 5-shot, 15 queries per class, ``--episodes`` (600) episodes among the
  held-out types, prototype (nearest class mean) and logistic-regression heads; mean and 95% CI (1.96
  standard errors over episodes).
- Zero-shot retrieval (extra): leave-one-out Recall@1 and MAP@R among the evaluated photos.
- Rows: raw pixels (16 x 16 RGB, centred, unit norm: a trivial baseline); the backbone at random
  initialisation (seed 0, the architecture of the pretrained model); the same random backbone with its
  BatchNorm statistics re-estimated on the evaluated photos (a stronger random baseline: a random CNN in
  eval mode normalises with the init's running statistics 0/1); the pretrained backbone
  (``visuray.models.embedding.load_embedding_model``), as published (its BatchNorm statistics are the
  teacher's running averages over augmented training crops) and with BatchNorm re-estimated like the
  random row. With ``--start-weights`` (a run continued from pretrained weights, e.g. the pretrain job's
  ``pretrain_lite0.yaml`` from ``efficientnet_lite0``): the starting weights as they are, and the margin
  DINO - starting weights, the question "did the self-supervised adaptation add anything?". Every row is
  fed with the artifact's recorded input statistics (a pretrained start's own mean and std).
- Margin pretrained - random init, paired: k-NN over the same test items (per-item correctness
  difference), few-shot over the same episodes (per-episode accuracy difference); mean and 95% CI.
  Reported as published vs random init as is, and BN re-estimated vs BN re-estimated (the like-for-like
  comparison of the weights).
- Collapse diagnostic: the effective rank (exp of the entropy of the normalised singular values) of the
  centred features.

Run:  python benchmarks/pretrain_quality.py runs/catalogs/fashion-products \\
          runs/models/pretrain-fashion-products-resnet18 [--out runs/benchmarks/pretrain_quality]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from visuray.images import InputSpec

RANDOM = "random init"
RANDOM_BN = "random init, BN re-estimated"
PRETRAINED = "DINO pretrained"
PRETRAINED_BN = "DINO pretrained, BN re-estimated"
START = "starting weights as is"  # --start-weights: what DINO continued from, untrained
PIXELS = "raw pixels (16x16 RGB)"


# ---------------------------------------------------------------- data


def heldout_rows(
    labels: list[str | None], min_class: int, per_class: int, seed: int
) -> tuple[np.ndarray, list[str]]:
    """Row indices of the evaluated photos and the held-out types (odd positions among eligible types
    sorted by name), at most ``per_class`` seeded-random photos of each."""
    names, counts = np.unique([lab for lab in labels if lab is not None], return_counts=True)
    eligible = sorted(str(n) for n, c in zip(names, counts, strict=True) if c >= min_class)
    held = eligible[1::2]
    rng = np.random.default_rng(seed)
    labels_arr = np.asarray(labels, dtype=object)
    keep: list[int] = []
    for name in held:
        rows = np.flatnonzero(labels_arr == name)
        keep.extend(rng.permutation(rows)[:per_class].tolist())
    return np.sort(np.asarray(keep, dtype=np.int64)), held


# ---------------------------------------------------------------- features


def backbone_features(backbone: Any, images: list[bytes], img_size: InputSpec | int) -> np.ndarray:
    """Pooled backbone features of encoded images, with the evaluation/serving preprocessing."""
    from visuray.evaluation.baselines import embed_images_in_process

    def pooled(batch: Any) -> Any:
        return backbone.forward_head(backbone.forward_features(batch), pre_logits=True)

    return embed_images_in_process(images, pooled, img_size, batch=128)


def reestimate_batchnorm(backbone: Any, images: list[bytes], img_size: InputSpec | int) -> Any:
    """A copy of ``backbone`` whose BatchNorm running statistics are the plain average over ``images``,
    in eval mode; weights untouched. A no-op copy for models without BatchNorm."""
    import copy

    from visuray.images import encoded_image_batches
    from visuray.models.batchnorm import reestimate_batchnorm as reestimate_in_place

    model = copy.deepcopy(backbone)
    reestimate_in_place(model, encoded_image_batches(images, img_size))
    return model.eval()  # also for a backbone without BatchNorm, which the re-estimation leaves as it was


def effective_rank(features: np.ndarray) -> float:
    """exp(entropy of the normalised singular values) of the centred features: 1 for a collapsed
    representation, up to the dimension for an isotropic one."""
    x = features - features.mean(axis=0, keepdims=True)
    s = np.linalg.svd(x.astype(np.float64), compute_uv=False)
    p = s / max(s.sum(), 1e-12)
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


# ---------------------------------------------------------------- evaluation


def knn_correct(
    features: np.ndarray,
    labels: np.ndarray,
    train: np.ndarray,
    test: np.ndarray,
    k: int = 20,
    temperature: float = 0.07,
) -> np.ndarray:
    """Per-test-item top-1 correctness of weighted k-NN (DINO's k=20, T=0.07 unless given)."""
    from visuray.evaluation.knn import knn_predict_scores

    votes, classes = knn_predict_scores(features[train], labels[train], features[test], k, temperature)
    return np.asarray(classes, dtype=object)[votes.argmax(axis=1)] == labels[test]


KNN_GRID_KS = (1, 5, 20, 50)
KNN_GRID_TEMPERATURES = (0.03, 0.07, 0.2)


def knn_grid(rows: dict[str, np.ndarray], labels: np.ndarray, seed: int) -> dict[str, dict[str, float]]:
    """k-NN top-1 of every row at each k and temperature of the grid, on the protocol's item split: is a
    k-NN margin a property of the features or of DINO's k=20, T=0.07?"""
    from visuray.evaluation.knn import l2_normalise, stratified_item_split

    train, test = stratified_item_split(labels, 0.5, seed)
    grid = {}
    for name, feats in rows.items():
        feats = l2_normalise(feats)
        grid[name] = {
            f"k={k} T={t}": float(knn_correct(feats, labels, train, test, k, t).mean())
            for k in KNN_GRID_KS
            for t in KNN_GRID_TEMPERATURES
        }
        print(f"  k-NN grid, {name}: " + ", ".join(f"{c} {v:.3f}" for c, v in grid[name].items()), flush=True)
    return grid


def paired(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Mean and 95% CI half-width of the paired difference a - b."""
    from visuray.evaluation.fewshot import mean_ci95

    return mean_ci95(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))


def evaluate_rows(
    rows: dict[str, np.ndarray], labels: np.ndarray, shots: tuple[int, ...], episodes: int, seed: int
) -> dict[str, Any]:
    """Every metric of every row, plus the per-item / per-episode values the paired margins need."""
    from visuray.evaluation.fewshot import HEADS, mean_ci95, sample_episodes
    from visuray.evaluation.knn import l2_normalise, stratified_item_split
    from visuray.evaluation.retrieval import retrieval_metrics

    train, test = stratified_item_split(labels, 0.5, seed)
    sampled = {k: sample_episodes(labels.tolist(), 5, k, 15, episodes, seed + k) for k in shots}
    per: dict[str, dict[str, np.ndarray]] = {}
    table: dict[str, dict[str, float]] = {}
    for name, feats in rows.items():
        feats = l2_normalise(feats)
        values = {"knn": knn_correct(feats, labels, train, test).astype(np.float64)}
        for k, eps in sampled.items():
            for head, fn in HEADS.items():
                values[f"5way{k}shot/{head}"] = fn(feats, eps)
        per[name] = values
        stats = {key: mean_ci95(v) for key, v in values.items()}
        table[name] = {key: m for key, (m, _) in stats.items()} | {
            f"{key}_ci95": c for key, (_, c) in stats.items()
        }
        retrieval = retrieval_metrics(feats, labels.tolist(), ks=(1,))
        table[name] |= {f"zeroshot/{k}": float(v) for k, v in retrieval.items()}
        table[name]["effective_rank"] = effective_rank(feats)
        table[name]["dim"] = float(feats.shape[1])
        print(f"  {name}: " + ", ".join(f"{k} {table[name][k]:.3f}" for k in values), flush=True)
    margins: dict[str, dict[str, float]] = {}
    pairs = ((PRETRAINED, RANDOM), (PRETRAINED, RANDOM_BN), (PRETRAINED_BN, RANDOM_BN), (PRETRAINED, START))
    for top, base in pairs:
        if top in per and base in per:
            margins[f"{top} - {base}"] = {}
            for key in per[top]:
                mean, ci = paired(per[top][key], per[base][key])
                margins[f"{top} - {base}"] |= {key: mean, f"{key}_ci95": ci}
    return {
        "table": table,
        "margins": margins,
        "num_knn_train": int(len(train)),
        "num_knn_test": int(len(test)),
    }


# ---------------------------------------------------------------- main


def markdown(results: dict[str, Any], shots: tuple[int, ...]) -> str:
    keys = ["knn"] + [f"5way{k}shot/{h}" for k in shots for h in ("prototype", "logreg")]
    head = (
        "| row | k-NN top-1 | " + " | ".join(k.replace("/", " ") for k in keys[1:]) + " | R@1 | eff. rank |"
    )
    lines = [head, "|---" * (len(keys) + 3) + "|"]
    for name, t in results["table"].items():
        cells = [f"{t[k]:.3f} ± {t[k + '_ci95']:.3f}" for k in keys]
        lines.append(
            f"| {name} | "
            + " | ".join(cells)
            + f" | {t['zeroshot/recall@1']:.3f} | {t['effective_rank']:.1f} |"
        )
    for name, m in results["margins"].items():
        cells = [f"{m[k]:+.3f} ± {m[k + '_ci95']:.3f}" for k in keys]
        lines.append(f"| margin {name} | " + " | ".join(cells) + " | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("catalog", help="the fashion-products catalog URI (label = articleType)")
    parser.add_argument("model", help="the pretrain job's model artifact URI")
    parser.add_argument(
        "--min-class", type=int, default=20, help="article types with at least this many photos"
    )
    parser.add_argument(
        "--per-class", type=int, default=200, help="at most this many photos per held-out type"
    )
    parser.add_argument("--episodes", type=int, default=600, help="few-shot episodes per shot count")
    parser.add_argument(
        "--knn-grid",
        action="store_true",
        help=f"also k-NN top-1 at k in {KNN_GRID_KS} x T in {KNN_GRID_TEMPERATURES} for every row",
    )
    parser.add_argument("--seed", type=int, default=0, help="split, subset, episodes and random-init seed")
    parser.add_argument("--out", default="runs/benchmarks/pretrain_quality", help="folder for results.json")
    parser.add_argument(
        "--cache",
        default=None,
        help="folder for the baseline rows' features (raw pixels, random init), reused when the catalog, "
        "backbone and seed match, so that evaluating several checkpoints embeds them once",
    )
    parser.add_argument(
        "--start-weights",
        default=None,
        help="the weights the pretrain job continued from (e.g. efficientnet_lite0): adds their row, as "
        "is, and the margin DINO - starting weights (is the self-supervised adaptation worth it?)",
    )
    args = parser.parse_args(argv)

    import torch

    from visuray.catalog.readers import load_catalog_frame
    from visuray.evaluation.baselines import raw_pixel_embedding
    from visuray.models.backbone import create_backbone
    from visuray.models.embedding import load_embedding_model, read_model_config
    from visuray.models.weights import load_pretrained

    started = time.monotonic()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    frame = load_catalog_frame(args.catalog, columns=["item_id", "image", "label"])
    keep, held = heldout_rows(frame["label"].tolist(), args.min_class, args.per_class, args.seed)
    images = [bytes(b) for b in frame["image"].to_numpy()[keep]]
    labels = np.asarray(frame["label"].to_numpy()[keep], dtype=object)
    print(f"{len(held)} held-out article types, {len(keep)} photos: {', '.join(held)}", flush=True)

    pretrained, artifact = load_embedding_model(args.model)
    backbone_cfg = read_model_config(artifact).backbone
    # The recorded input statistics (a pretrained start's own mean/std), for every row alike.
    img_size = backbone_cfg.input_spec
    torch.manual_seed(args.seed)
    random_backbone = create_backbone(backbone_cfg).eval()

    featurizers: dict[str, Callable[[], np.ndarray]] = {
        PIXELS: lambda: raw_pixel_embedding(images),
        RANDOM: lambda: backbone_features(random_backbone, images, img_size),
        RANDOM_BN: lambda: backbone_features(
            reestimate_batchnorm(random_backbone, images, img_size), images, img_size
        ),
    }
    key = hashlib.sha256(
        json.dumps([args.catalog, backbone_cfg.model_dump(mode="json"), keep.tolist(), args.seed]).encode()
    ).hexdigest()[:16]
    rows: dict[str, np.ndarray] = {}
    for name, make in featurizers.items():
        cached = (
            Path(args.cache, f"{key}-{name.replace(' ', '_').replace(',', '')}.npy") if args.cache else None
        )
        if cached is not None and cached.exists():
            rows[name] = np.load(cached)
            continue
        rows[name] = make()
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            np.save(cached, rows[name])
    if args.start_weights:
        start_cfg = backbone_cfg.model_copy(update={"weights": args.start_weights, "weights_layout": "auto"})
        start = create_backbone(start_cfg)
        load_pretrained(start, start_cfg)
        rows[START] = backbone_features(start.eval(), images, img_size)
    rows[PRETRAINED] = backbone_features(pretrained.backbone, images, img_size)
    rows[PRETRAINED_BN] = backbone_features(
        reestimate_batchnorm(pretrained.backbone, images, img_size), images, img_size
    )
    results = evaluate_rows(rows, labels, (1, 5), args.episodes, args.seed)
    if args.knn_grid:
        results["knn_grid"] = knn_grid(rows, labels, args.seed)
    metadata = artifact.manifest.metadata if hasattr(artifact.manifest, "metadata") else {}
    results |= {
        "catalog": args.catalog,
        "model": artifact.uri,
        "model_metadata": metadata,
        "backbone": backbone_cfg.model_dump(mode="json"),
        "heldout_types": held,
        "num_photos": int(len(keep)),
        "episodes": args.episodes,
        "seconds": round(time.monotonic() - started, 1),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    print(markdown(results, (1, 5)))
    print(f"wrote {out / 'results.json'} in {results['seconds']} s")
    return results


if __name__ == "__main__":
    main()
