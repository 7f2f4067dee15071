"""Attribute quality on fashion-products: channel-attention head vs the pooled baseline, on clean catalog
photos and on the same held-out products pasted onto wild backgrounds, plus the depth-per-group sweep.

Protocol
--------
Data: the fashion-products catalog, ingested with the project's ingest job
(``jobs/configs/ingest_fashion_products.yaml`` into ``runs/catalogs/fashion-products``). Labels: the
``train_attributes`` job's groups (gender, category = subCategory, article type, colour, usage, season;
values with at least ``--min-count`` training products). Products are split by a hash of the product id
(the job's ``split``: 80 / 10 / 10); the first ``--train-items`` training products train, the first
``--eval-items`` validation and test products are scored.

Models (all in this process, same data order, augmentation and head initialisation for every model). Each
is built from the job's own configs: ``jobs/configs/train_attributes_lite0.yaml`` (``head: attention``)
and ``train_attributes_lite0_baseline.yaml`` (``head: pooled``; the script refuses to run if the two
differ in anything but the head), through the job's pieces (:func:`visuray.models.weights.check_pretrained`,
:func:`visuray.attributes.model.build_attribute_model`, :func:`visuray.models.weights.prepare_for_training`,
:func:`visuray.attributes.fit.fit_in_process`, which steps like the job's loop):

1. ``pooled``: every group's head is global average pooling + linear at the last tap (the baseline);
2. ``attention``: every group's head is the channel-attention semantic embedding at the last tap;
3. ``probe``: one model with an attention head for every group at *every* tap (one backbone pass);
   validation macro AUC per (group, tap) picks each group's depth;
4. ``picked``: the attention model with the picked depths, trained like (2).

Backbones (``--backbone``):

- ``vit-tiny`` (default; the earlier protocol, kept so its results reproduce): a ViT-tiny with
  ``--depth`` blocks and 8 px patches at 64 px from random init (weights null), ImageNet mean/std, embed
  dim 128, nothing frozen. Depth = ViT block.
- ``lite0``: ``tf_efficientnet_lite0`` from the bundled ImageNet weights (``efficientnet_lite0``), fed
  with the weights' own mean/std (0.5 / 0.5), at 128 px (the job's size: the last tap is a 4 x 4 map of
  320 channels), stem + first 5 of 7 stages frozen and BatchNorm statistics held (the job's
  ``batchnorm_statistics: auto``), attention embed dim 64: the demo's CPU settings (``demo/specs.py``).
  Depth = tap of timm's ``feature_info``: Lite0 has 5 (the ends of stages 1, 2, 3, 5 and 7; 16, 24,
  40, 112 and 320 channels at 1/2 ... 1/32 of the image), so the sweep covers taps 1-5; with 5 stages
  frozen, heads at taps 1-4 read frozen ImageNet features.

Train-time backgrounds (``--train-backgrounds on``): each training image, with probability
``--composite-prob`` per image and step, is cut out of its white studio background and pasted over a
random crop of a street photo from ``--train-backgrounds-dir`` (clothing-small ``train``), with the same
cut-out as the wild condition (:class:`visuray.attributes.backgrounds.BackgroundCompositing`). Those
photos are never the evaluation's: clothing-small ``test`` makes the wild test set and ``validation`` the
wild validation set (the script refuses overlapping folders). Off (default) trains on clean photos only.

Evaluation: the scored products (test; validation products with ``--validate``) clean, and composited
onto crops of ``--backgrounds`` photos (``visuray.attributes.backgrounds``: near-white pixels connected to
the border are background; a fixed background and crop per product). Reported: macro/micro AUC and mAP
per model and condition, macro AUC per group, the sweep table, and for attention over pooled (and picked
over attention) the mean relative AUC change per label beside the reference work's +15.27 %, and the
macro AUC difference, each with a paired 95 % interval: a bootstrap over the scored products
(``N_BOOT`` resamples, seed ``BOOT_SEED``; both models scored on the same resample). ``--compare-to DIR``
adds the same paired intervals against another run's models on the same products (compositing on vs
off). Labels with fewer than ``--min-positives`` positives (or negatives) among the scored products are
listed, not averaged. With ``--validate`` the ``picked`` row is scored on the products that picked its
depths, so it is optimistic there; compare pooled and attention only.

Full protocol (``lite0``; settings chosen on validation, then the test products scored once). Cost,
measured at batch 32 and 128 px on one thread of a loaded 2-core machine: ~0.7 s a step for pooled,
attention and picked, ~2.1 s for the probe (five taps of heads); at 300 steps a run with the sweep takes
~25 min (training ~21 min, decoding, masks, inference and the bootstrap the rest), one with
``--skip-sweep`` ~9 min, the six runs below ~70 min in all (less on two idle threads).

    # 1. validation (test products untouched; wild = clothing-small validation photos): lr, then the
    #    compositing probability, each by the attention model's validation macro AUC (clean + wild mean)
    for lr in 1e-3 3e-4; do
      python benchmarks/attributes_quality.py --backbone lite0 --validate --skip-sweep --lr $lr \\
          --train-items 3000 --eval-items 800 --steps 300 --batch-size 32 --threads 2 \\
          --backgrounds ../shared/data/clothing-small/validation \\
          --output runs/benchmarks/attributes_quality_lite0_val_lr$lr
    done
    for p in 0.5 0.8; do
      python benchmarks/attributes_quality.py --backbone lite0 --validate --skip-sweep --lr LR \\
          --train-backgrounds on --composite-prob $p \\
          --train-items 3000 --eval-items 800 --steps 300 --batch-size 32 --threads 2 \\
          --backgrounds ../shared/data/clothing-small/validation \\
          --output runs/benchmarks/attributes_quality_lite0_val_bg$p
    done
    # 2. test, once, with the chosen LR and P: pooled vs attention and the sweep, compositing off ...
    python benchmarks/attributes_quality.py --backbone lite0 --lr LR \\
        --train-items 3000 --eval-items 800 --steps 300 --batch-size 32 --threads 2 \\
        --backgrounds ../shared/data/clothing-small/test --output runs/benchmarks/attributes_quality_lite0
    # ... and on, paired against the off run on the same test products
    python benchmarks/attributes_quality.py --backbone lite0 --lr LR --train-backgrounds on --composite-prob P \\
        --train-items 3000 --eval-items 800 --steps 300 --batch-size 32 --threads 2 \\
        --backgrounds ../shared/data/clothing-small/test --output runs/benchmarks/attributes_quality_lite0_bg \\
        --compare-to runs/benchmarks/attributes_quality_lite0

The earlier ViT-tiny run (``benchmarks/README.md``):

    python benchmarks/attributes_quality.py --catalog runs/catalogs/fashion-products \\
        --backgrounds ../shared/data/clothing-small/test --output runs/benchmarks/attributes_quality_small \\
        --train-items 1500 --eval-items 400 --steps 150 --batch-size 32 --threads 1
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
# One bootstrap for every benchmark: the resample counts (queries there, products here) and their size.
from finetune_quality import N_BOOT, bootstrap_counts  # noqa: E402

JOB_CONFIGS = Path(__file__).resolve().parent.parent / "jobs" / "configs"
HEAD_SPECS = {"attention": "train_attributes_lite0.yaml", "pooled": "train_attributes_lite0_baseline.yaml"}
# The reference work's mean relative AUC improvement per label of its attention heads over pooling.
REFERENCE_MEAN_RELATIVE_AUC = 0.1527
CLOTHING_SMALL = "../shared/data/clothing-small"  # street photos: train / validation / test folders
CONDITIONS = ("clean", "wild")
# Per backbone, what a flag left unset means: vit-tiny keeps the earlier protocol's values, lite0 takes
# the demo's CPU settings (demo/specs.py: 128 px, 5 of 7 stages frozen, embed dim 64).
BACKBONE_DEFAULTS: dict[str, dict[str, int]] = {
    "vit-tiny": {"img_size": 64, "freeze_blocks": 0, "embed_dim": 128},
    "lite0": {"img_size": 128, "freeze_blocks": 5, "embed_dim": 64},
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--catalog", default="runs/catalogs/fashion-products")
    parser.add_argument("--backbone", choices=sorted(BACKBONE_DEFAULTS), default="vit-tiny",
                        help="vit-tiny: random-init ViT (the earlier protocol); lite0: pretrained "
                        "EfficientNet-Lite0 as the train_attributes job builds it")  # fmt: skip
    parser.add_argument("--backgrounds", default=None,
                        help="photos of the wild evaluation condition, or 'clutter' for generated clutter; "
                        "default clothing-small test (validation with --validate)")  # fmt: skip
    parser.add_argument("--train-backgrounds", choices=("off", "on"), default="off",
                        help="on: composite training products onto street-photo crops (augmentation)")  # fmt: skip
    parser.add_argument("--train-backgrounds-dir", default=f"{CLOTHING_SMALL}/train",
                        help="photos for the training composites; never the evaluation's")  # fmt: skip
    parser.add_argument("--composite-prob", type=float, default=0.5,
                        help="chance per image and step of a composite; 0.5 keeps half the batch clean, "
                        "so the clean-photo task is not traded away")  # fmt: skip
    parser.add_argument("--background-crops", type=int, default=2000,
                        help="crops cut once from those photos; 2000 is ~2/3 of clothing-small train's "
                        "photos, cheap to hold at 128 px (~100 MB)")  # fmt: skip
    parser.add_argument("--validate", action="store_true",
                        help="score the validation products instead of the test products (choosing settings)")  # fmt: skip
    parser.add_argument("--compare-to", default=None,
                        help="another run's --output: paired intervals of this run's models over its models")  # fmt: skip
    parser.add_argument("--output", default="runs/benchmarks/attributes_quality")
    parser.add_argument("--train-items", type=int, default=3000, help="training products (subset)")
    parser.add_argument("--eval-items", type=int, default=800, help="val and test products each (subset)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--img-size", type=int, default=None, help="default: 64 (vit-tiny), 128 (lite0)")
    parser.add_argument("--depth", type=int, default=4, help="ViT blocks (vit-tiny only)")
    parser.add_argument("--freeze-blocks", type=int, default=None,
                        help="stem + first N block groups frozen; default 0 (vit-tiny), 5 of 7 stages (lite0)")  # fmt: skip
    parser.add_argument("--embed-dim", type=int, default=None,
                        help="attention heads' semantic channels; default 128 (vit-tiny), 64 (lite0)")  # fmt: skip
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--min-count", type=int, default=20)
    parser.add_argument("--min-positives", type=int, default=5)
    parser.add_argument("--skip-sweep", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if args.backgrounds is None:  # validation never looks at the wild test set's photos
        args.backgrounds = f"{CLOTHING_SMALL}/{'validation' if args.validate else 'test'}"
    for key, value in BACKBONE_DEFAULTS[args.backbone].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.train_backgrounds == "on":
        check_disjoint_backgrounds(args.train_backgrounds_dir, args.backgrounds)
    return args


def check_disjoint_backgrounds(train_dir: str, eval_spec: str) -> None:
    """Refuse training composites whose photos could be the evaluation's: the wild condition must show
    backgrounds the model never trained on."""
    if eval_spec == "clutter" or train_dir == "clutter":
        return
    a, b = Path(train_dir).resolve(), Path(eval_spec).resolve()
    if a == b or a in b.parents or b in a.parents:
        raise SystemExit(
            f"--train-backgrounds-dir {train_dir} overlaps --backgrounds {eval_spec}: train on other photos "
            "(clothing-small train) than the wild evaluation's (validation or test)"
        )


# ---------------------------------------------------------------- models


def job_configs(args: argparse.Namespace) -> dict[str, Any]:
    """The ``train_attributes`` job's configs of the attention model and its pooled baseline, with this
    run's backbone and CPU settings as overrides."""
    from visuray.jobspec import load_job_spec

    overrides = [
        f"catalog={args.catalog}", f"model.backbone.img_size={args.img_size}",
        f"model.embed_dim={args.embed_dim}", f"train.freeze_blocks={args.freeze_blocks}",
        f"labels.min_count={args.min_count}", f"eval.min_positives={args.min_positives}",
    ]  # fmt: skip
    if args.backbone == "vit-tiny":
        overrides += [
            "model.backbone.name=vit_tiny_patch16_224", "model.backbone.weights=null",
            "model.backbone.patch_size=8", f"model.backbone.depth={args.depth}",
        ]  # fmt: skip
    configs = {head: load_job_spec(JOB_CONFIGS / file, overrides)[1] for head, file in HEAD_SPECS.items()}
    for head, cfg in configs.items():
        if cfg.model.head != head:
            raise SystemExit(f"{HEAD_SPECS[head]} sets head {cfg.model.head!r}, expected {head!r}")
    # A controlled comparison: the baseline's spec may differ from the model's in the head alone.
    sections = ("model", "labels", "split", "loss", "train")
    dumps = {
        head: {s: getattr(cfg, s).model_dump(exclude={"head"} if s == "model" else None) for s in sections}
        for head, cfg in configs.items()
    }
    if dumps["attention"] != dumps["pooled"]:
        raise SystemExit(f"{HEAD_SPECS['pooled']} differs from {HEAD_SPECS['attention']} beyond the head")
    return configs


def tap_table(backbone: Any) -> list[dict[str, Any]]:
    """What each tap of ``backbone`` is (timm's feature_info): depth 1..T, module, channels, stride."""
    return [
        {
            "depth": d + 1,
            "module": info["module"],
            "channels": info["num_chs"],
            "reduction": info["reduction"],
        }
        for d, info in enumerate(backbone.feature_info)
    ]


# ---------------------------------------------------------------- statistics


def weighted_label_aucs(
    scores: np.ndarray, targets: np.ndarray, known: np.ndarray, labels: Sequence[int], counts: np.ndarray
) -> np.ndarray:
    """(R, len(labels)): each label's ROC AUC on each resample, a product counted as often as ``counts``
    (R, N) draws it. The Mann-Whitney statistic with weights (ties count one half): what
    :func:`visuray.attributes.metrics.roc_auc` gives on the resampled rows, without materialising them.
    NaN where a resample holds no positive or no negative."""
    out = np.full((len(counts), len(labels)), np.nan)
    for k, j in enumerate(labels):
        rows = np.flatnonzero(known[:, j])
        order = np.argsort(scores[rows, j], kind="mergesort")
        s, y = scores[rows, j][order].astype(np.float64), targets[rows, j][order] > 0.5
        starts = np.r_[0, np.flatnonzero(np.diff(s)) + 1]  # groups of tied scores, ascending
        w = counts[:, rows[order]].astype(np.float64)
        pos = np.add.reduceat(w * y, starts, axis=1)
        neg = np.add.reduceat(w * ~y, starts, axis=1)
        below = np.cumsum(neg, axis=1) - neg  # negative weight strictly below each tie group
        wins = (pos * (below + 0.5 * neg)).sum(axis=1)
        pairs = pos.sum(axis=1) * neg.sum(axis=1)
        out[:, k] = np.divide(wins, pairs, out=np.full(len(counts), np.nan), where=pairs > 0)
    return out


def resampled_aucs(
    scores: np.ndarray, targets: np.ndarray, known: np.ndarray, labels: Sequence[int], counts: np.ndarray
) -> np.ndarray:
    """(1 + R, len(labels)) per-label AUCs: row 0 on the scored products themselves, then one row per
    resample of ``counts``."""
    every = np.vstack([np.ones((1, counts.shape[1]), dtype=counts.dtype), counts])
    return weighted_label_aucs(scores, targets, known, labels, every)


def paired_auc_margin(model: np.ndarray, baseline: np.ndarray) -> dict[str, Any]:
    """Macro AUC of ``model`` minus ``baseline`` and the mean per-label relative AUC change, from their
    :func:`resampled_aucs` on the same resamples, each with the 2.5 / 97.5 percentiles over the resamples:
    both models are scored on the same resampled products, so the interval is paired."""
    # A resample can leave a label's baseline AUC at 0 (a handful of positives): no relative change there.
    base = np.where(baseline > 0, baseline, np.nan)
    with np.errstate(invalid="ignore"):
        macro = np.nanmean(model, axis=1) - np.nanmean(baseline, axis=1)
        relative = np.nanmean((model - base) / base, axis=1)
    return {
        "macro_auc_diff": float(macro[0]),
        "macro_auc_diff_ci95": [float(v) for v in np.nanpercentile(macro[1:], [2.5, 97.5])],
        "mean_relative_auc": float(relative[0]),
        "mean_relative_auc_ci95": [float(v) for v in np.nanpercentile(relative[1:], [2.5, 97.5])],
        "labels": model.shape[1],
        "resamples": len(model) - 1,
    }


def group_macro(report: dict[str, Any], groups: list[str]) -> dict[str, float]:
    out = {}
    for group in groups:
        aucs = [e["auc"] for e in report["per_label"] if e["label"].split("=", 1)[0] == group]
        out[group] = float(np.mean(aucs)) if aucs else float("nan")
    return out


def pct(value: float) -> str:
    return f"{100 * value:+.2f}%"


def interval(bounds: Sequence[float], scale: float = 1.0, digits: int = 4) -> str:
    lo, hi = (scale * v for v in bounds)
    return f"[{lo:+.{digits}f}, {hi:+.{digits}f}]"


def report_lines(summary: dict[str, Any]) -> list[str]:
    """The human-readable report (printed and written to ``report.md``)."""
    split = summary["scored_split"]
    lines = [
        f"backbone {summary['backbone']}, train backgrounds {summary['train_backgrounds']['mode']}, "
        f"scored on {split} products ({summary['products'][split]}), {summary['labels']} labels",
        "",
        "| model | condition | macro AUC | micro AUC | mAP | labels evaluated | train s | s/step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, model in summary["models"].items():
        for condition in CONDITIONS:
            m = model[condition]
            lines.append(
                f"| {key} | {condition} | {m['macro_auc']:.4f} | {m['micro_auc']:.4f} | {m['map']:.4f} | "
                f"{m['num_evaluated']} | {summary['train_seconds'][key]:.0f} | "
                f"{summary['seconds_per_step'][key]:.2f} |"
            )
    lines += [
        "",
        f"paired comparisons ({N_BOOT} bootstrap resamples of the scored products, 95% intervals); "
        f"reference work: mean relative AUC change {pct(REFERENCE_MEAN_RELATIVE_AUC)}",
        "",
        "| comparison | condition | macro AUC diff | 95% CI | mean relative AUC change | 95% CI | reference |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, per_condition in summary["paired"].items():
        # The reference figure is attention over pooling; other comparisons have none.
        reference = pct(REFERENCE_MEAN_RELATIVE_AUC) if name == "attention - pooled" else "-"
        for condition, p in per_condition.items():
            lines.append(
                f"| {name} | {condition} | {p['macro_auc_diff']:+.4f} | {interval(p['macro_auc_diff_ci95'])} | "
                f"{pct(p['mean_relative_auc'])} | {interval(p['mean_relative_auc_ci95'], 100, 2)}% | {reference} |"
            )
    for condition in CONDITIONS:
        rel = summary["relative_auc_attention_vs_pooled"][condition]
        lines.append(
            f"\nattention vs pooled, {condition}: {rel['labels_improved']}/{rel['labels_compared']} labels improved"
        )
    lines += ["", "per-group macro AUC:"]
    for condition in CONDITIONS:
        for key, model in summary["models"].items():
            groups = ", ".join(f"{g} {v:.3f}" for g, v in model[condition]["per_group_macro_auc"].items())
            lines.append(f"- {key}, {condition}: {groups}")
    if summary["depth_sweep_val_macro_auc"]:
        taps = summary["taps"]
        lines += [
            "",
            "depth sweep (validation macro AUC of the probe; tap = module, channels, stride):",
            "",
            "| group | " + " | ".join(f"{t['depth']}: {t['module']} {t['channels']}ch /{t['reduction']}" for t in taps)
            + " | picked |",
            "|---|" + "---|" * (len(taps) + 1),
        ]  # fmt: skip
        for group, by_depth in summary["depth_sweep_val_macro_auc"].items():
            cells = " | ".join(f"{by_depth[t['depth']]:.3f}" for t in taps)
            lines.append(f"| {group} | {cells} | {summary['picked_depths'][group]} |")
    lines.append(f"\nwall time {summary['wall_seconds']}s")
    return lines


# ---------------------------------------------------------------- main


def main() -> None:
    import torch

    from visuray.attributes.config import AttributeModelConfig, GroupHead
    from visuray.attributes.data import decode_to_uint8, prepare_catalog, resolve_model_config
    from visuray.attributes.evaluate import wild_editor
    from visuray.attributes.fit import fit_in_process, predict_probabilities
    from visuray.attributes.metrics import (
        micro_roc_curve,
        multilabel_report,
        plot_roc_png,
        relative_improvement,
    )
    from visuray.attributes.model import build_attribute_model, num_taps
    from visuray.models.weights import check_pretrained, prepare_for_training

    args = parse_args()
    torch.set_num_threads(args.threads)
    started = time.monotonic()
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    jobs = job_configs(args)
    job = jobs["attention"]
    specs = job.labels.groups
    data = prepare_catalog(args.catalog, None, specs, job.split, args.min_count)
    train = data.splits["train"][: args.train_items]
    val = data.splits["val"][: args.eval_items]
    scored_split = "val" if args.validate else "test"
    scored = data.splits[scored_split][: args.eval_items]
    names, groups = data.space.names, [g.name for g in data.space.groups]
    print(
        f"{len(names)} labels in {groups}; {len(train)}/{len(val)} train/val products, "
        f"{len(scored)} {scored_split} products scored"
    )
    # The weights' own mean/std (random init: ImageNet's), as the job's driver records them.
    backbone = check_pretrained(job.model.backbone)
    spec = backbone.input_spec
    print(f"backbone {backbone.name} ({args.backbone}), weights {backbone.weights}, {spec}")

    def decode(idx: list[int], wild: bool = False) -> torch.Tensor:
        editor = wild_editor(args.backgrounds, [data.rows.item_ids[i] for i in idx], 0) if wild else None
        return decode_to_uint8([data.rows.image_bytes(i) for i in idx], spec.img_size, editor)

    t0 = time.monotonic()
    images = {
        "train": decode(train),
        "val": decode(val),
        "clean": decode(scored),
        "wild": decode(scored, True),
    }
    print(f"decoded in {time.monotonic() - t0:.0f}s")
    from torchvision.utils import save_image

    save_image(
        torch.cat([images["clean"][:8], images["wild"][:8]]).float() / 255, out / "wild_examples.png", nrow=8
    )

    composite = None
    if args.train_backgrounds == "on":
        from visuray.attributes.backgrounds import (
            BackgroundBank,
            BackgroundCompositing,
            background_crops,
            foreground_alphas,
        )

        t0 = time.monotonic()
        bank = (
            BackgroundBank()
            if args.train_backgrounds_dir == "clutter"
            else BackgroundBank.from_folder(args.train_backgrounds_dir, limit=None)
        )
        alphas = foreground_alphas([data.rows.image_bytes(i) for i in train], spec.img_size)
        crops = background_crops(bank, args.background_crops, spec.img_size, seed=1)
        composite = BackgroundCompositing(alphas, crops, args.composite_prob, seed=0)
        print(
            f"training composites: {len(crops)} crops of {len(bank.paths)} photos ({bank.kind}) from "
            f"{args.train_backgrounds_dir}, p={args.composite_prob}, masks in {time.monotonic() - t0:.0f}s"
        )
        examples = composite(images["train"][:16], list(range(16)), 0)
        save_image(examples.float() / 255, out / "train_composites.png", nrow=8)

    def train_model(
        name: str, cfg: AttributeModelConfig, targets: np.ndarray, known: np.ndarray
    ) -> tuple[Any, float]:
        torch.manual_seed(0)  # the same head initialisation for every model
        model = build_attribute_model(cfg)
        loaded = prepare_for_training(model.backbone, cfg.backbone, freeze_blocks=args.freeze_blocks)
        t = time.monotonic()
        losses = fit_in_process(
            model, images["train"], spec, targets, known, job.loss, args.steps, args.batch_size, args.lr,
            warmup_steps=args.steps // 10, seed=0, composite=composite,
        )  # fmt: skip
        seconds = time.monotonic() - t
        print(
            f"  trained {name} in {seconds:.0f}s ({seconds / max(args.steps, 1):.2f} s/step), "
            f"loss {losses[0]:.3f} -> {losses[-1]:.3f}" + (f"; weights: {loaded.summary()}" if loaded else "")
        )
        return model, seconds

    arch = job.model.model_copy(update={"backbone": backbone})

    def config(head: str, depths: dict[str, int] | None = None) -> AttributeModelConfig:
        at = [s.model_copy(update={"depth": (depths or {}).get(s.name, s.depth)}) for s in specs]
        return resolve_model_config(arch.model_copy(update={"head": head}), at, data.space)

    scored_targets, scored_known = data.targets[scored], data.known[scored]

    def evaluate(model: Any) -> dict[str, Any]:
        result = {}
        for condition in CONDITIONS:
            scores = predict_probabilities(model, images[condition], spec)
            report = multilabel_report(scores, scored_targets, scored_known, names, args.min_positives)
            report["per_group_macro_auc"] = group_macro(report, groups)
            report["scores"] = scores
            result[condition] = report
        return result

    results: dict[str, Any] = {}
    timings: dict[str, float] = {}
    taps: list[dict[str, Any]] = []
    for head in ("pooled", "attention"):
        cfg = config(head)
        print(f"[{head}] all groups at the last tap")
        model, timings[head] = train_model(head, cfg, data.targets[train], data.known[train])
        taps = tap_table(model.backbone)
        results[head] = evaluate(model)

    picked: dict[str, int] = {}
    sweep: dict[str, dict[int, float]] = {}
    if not args.skip_sweep:
        depths = range(1, len(taps) + 1)
        print(f"[probe] an attention head per group at every one of {len(taps)} taps, one backbone pass")
        probe_heads, columns = [], []
        slices = data.space.group_slices()
        for depth in depths:
            for g in data.space.groups:
                probe_heads.append(GroupHead(name=f"{g.name}@{depth}", labels=list(g.labels), depth=depth))
                columns.extend(range(slices[g.name].start, slices[g.name].stop))
        probe_cfg = AttributeModelConfig(**arch.model_dump(), groups=probe_heads)
        probe, timings["probe"] = train_model(
            "probe", probe_cfg, data.targets[train][:, columns], data.known[train][:, columns]
        )
        assert num_taps(probe.backbone) == len(taps)
        val_scores = predict_probabilities(probe, images["val"], spec)
        probe_names = [f"{n}@{d}" for d in depths for n in names]
        report = multilabel_report(
            val_scores, data.targets[val][:, columns], data.known[val][:, columns], probe_names,
            args.min_positives,
        )  # fmt: skip
        for g in groups:
            sweep[g] = {}
            for depth in depths:
                aucs = [e["auc"] for e in report["per_label"] if e["label"].split("=")[0] == g
                        and e["label"].endswith(f"@{depth}")]  # fmt: skip
                sweep[g][depth] = float(np.mean(aucs)) if aucs else float("nan")
            picked[g] = max(sweep[g], key=lambda d: -np.inf if np.isnan(sweep[g][d]) else sweep[g][d])
        print(f"  picked depths (validation macro AUC): {picked}")
        print("[picked] attention heads at the picked depths")
        model, timings["picked"] = train_model(
            "picked", config("attention", picked), data.targets[train], data.known[train]
        )
        results["picked"] = evaluate(model)

    # ---------------- paired statistics ----------------
    evaluated = [names.index(e["label"]) for e in results["pooled"]["clean"]["per_label"]]
    counts = bootstrap_counts(len(scored))

    def aucs_of(scores: np.ndarray) -> np.ndarray:
        return resampled_aucs(scores, scored_targets, scored_known, evaluated, counts)

    t0 = time.monotonic()
    aucs = {(key, c): aucs_of(r[c]["scores"]) for key, r in results.items() for c in CONDITIONS}
    for (key, c), table in aucs.items():  # on the sample itself the resampling code must give the report
        gap = abs(float(np.mean(table[0])) - results[key][c]["macro_auc"])
        assert gap < 1e-9, f"{key}, {c}: resampled AUCs disagree with the report by {gap}"
    comparisons = [
        ("attention - pooled", "attention", "pooled"),
        ("picked - attention", "picked", "attention"),
    ]
    paired: dict[str, dict[str, Any]] = {
        name: {c: paired_auc_margin(aucs[a, c], aucs[b, c]) for c in CONDITIONS}
        for name, a, b in comparisons
        if a in results
    }
    item_ids = np.array([data.rows.item_ids[i] for i in scored])
    if args.compare_to:
        other = np.load(Path(args.compare_to) / "scores.npz", allow_pickle=False)
        if not np.array_equal(other["item_ids"], item_ids) or list(other["labels"]) != names:
            raise SystemExit(f"--compare-to {args.compare_to} scored other products or labels than this run")
        for key in results:
            for c in CONDITIONS:
                if f"{key}/{c}" in other:
                    name = f"{key} - {key} of {args.compare_to}"
                    paired.setdefault(name, {})[c] = paired_auc_margin(
                        aucs[key, c], aucs_of(other[f"{key}/{c}"])
                    )
    print(f"paired bootstrap ({N_BOOT} resamples) in {time.monotonic() - t0:.0f}s")
    np.savez_compressed(
        out / "scores.npz",
        item_ids=item_ids,
        labels=np.array(names),
        **{f"{key}/{c}": r[c]["scores"] for key, r in results.items() for c in CONDITIONS},
    )

    # ---------------- figures ----------------
    curves = {}
    for key, title in (("pooled", "pooled baseline"), ("attention", "channel attention")):
        for condition in CONDITIONS:
            r = results[key][condition]
            fpr, tpr = micro_roc_curve(r["scores"], scored_targets, scored_known, evaluated)
            curves[f"{title}, {condition}"] = (fpr, tpr, r["micro_auc"])
    roc_png = plot_roc_png(
        out / "roc.png", curves, f"fashion-products attributes, held-out {scored_split} products (micro)"
    )

    summary: dict[str, Any] = {
        "command_args": vars(args),
        "backbone": args.backbone,
        "backbone_config": backbone.model_dump(),
        "freeze_blocks": args.freeze_blocks,
        "scored_split": scored_split,
        "labels": len(names),
        "products": {"train": len(train), "val": len(val), scored_split: len(scored)},
        "backgrounds": args.backgrounds,
        "train_backgrounds": {
            "mode": args.train_backgrounds,
            "photos": args.train_backgrounds_dir if composite is not None else None,
            "probability": args.composite_prob if composite is not None else 0.0,
        },
        "models": {},
        "reference_mean_relative_auc": REFERENCE_MEAN_RELATIVE_AUC,
        "relative_auc_attention_vs_pooled": {},
        "paired": paired,
        "taps": taps,
        "depth_sweep_val_macro_auc": sweep,
        "picked_depths": picked,
        "train_seconds": timings,
        "seconds_per_step": {k: v / max(args.steps, 1) for k, v in timings.items()},
        "roc_png": str(roc_png),
    }
    for key, r in results.items():
        summary["models"][key] = {
            condition: {k: r[condition][k] for k in ("macro_auc", "micro_auc", "map", "num_evaluated")}
            | {"per_group_macro_auc": r[condition]["per_group_macro_auc"],
               "too_few_positives": [e["label"] for e in r[condition]["too_few"]]}
            for condition in CONDITIONS
        }  # fmt: skip
    for condition in CONDITIONS:
        rel = relative_improvement(results["attention"][condition], results["pooled"][condition])
        summary["relative_auc_attention_vs_pooled"][condition] = rel
        if "picked" in results:
            rel_p = relative_improvement(results["picked"][condition], results["attention"][condition])
            summary.setdefault("relative_auc_picked_vs_last_block", {})[condition] = rel_p
    summary["wall_seconds"] = round(time.monotonic() - started, 1)
    for r in results.values():
        for condition in CONDITIONS:
            r[condition].pop("scores")
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=float))
    (out / "reports.json").write_text(json.dumps(results, indent=1, default=float))
    lines = report_lines(summary)
    if args.validate and "picked" in results:
        lines.append("note: --validate scores picked on the products that picked its depths (optimistic)")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n" + "\n".join(lines) + f"\nfigures and scores in {out}")


if __name__ == "__main__":
    main()
