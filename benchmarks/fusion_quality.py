"""Composed-retrieval quality: MAAF and residual attention fusion against the baselines, same budget.

On the fashion-products composed set (queries TEMPLATED from real attributes: "same article type, in
<colour>" and product-line colour variants), every model trains for the same steps, batch, learning rate
and seed from the same start, on the training product lines, and is evaluated on held-out product lines
(their items are the references and the gallery). Reported: Recall@1/10/50, (R@10 + R@50) / 2, CFQ-style
AUCs, and each fusion model's margin over every baseline.

Where every row's image encoder starts (``--image-backbone``):

- ``vit-tiny`` (default, the earlier results): a 2-block ViT from random init at 64 px, 4 x 4 tokens;
- ``lite0``: the train_fusion job's start (jobs/configs/train_fusion_lite0.yaml), through the job's own
  pieces: the bundled ImageNet EfficientNet-Lite0 at 128 px (4 x 4 tokens of 1280 channels), stem and first
  5 of 7 stages frozen, BatchNorm statistics held, the weights' own normalisation, residual fusion weight
  0.1 (``--img-size``, ``--freeze-blocks``, ``--residual-init-weight`` change them). It adds the row
  ``image_only_as_is``: the pretrained pooled features with no step and an identity projection, i.e. plain
  visual search on the reference image, text ignored. The trained ``image_only`` row ignores the text too
  but is trained on the queries (to look past the changes they ask for); the untrained row is the floor a
  pretrained start gives for free, and counts as a baseline in the margins.

The text encoder is trained from scratch on the templated texts in every row; ``--caption-vocab ROOT``
also trains the tokenizer's vocabulary on the Fashion IQ training captions (human-written): their words
split into fewer pieces (the templated texts stay whole words either way), but the encoder never trains
on them (there is no caption pretraining step).

Model selection is done on validation, never on the test lines: ``--val-fraction 0.2 --split val``
holds out 20% of the TRAINING product lines, trains without them and scores every row on them (the
test lines are not evaluated). Settings chosen there (per row with ``--override``, e.g.
``concat.composer_lr_scale=4``) are then run with ``--split test`` (``--val-fraction 0``: training on all
training lines) on several seeds; every baseline gets the same settings grid on validation. The image
backbone, its settings and ``--caption-vocab`` are the same in the validation and the test runs.

Besides the means, every run keeps each query's first-hit rank per row (``hit_ranks.npz``, with
``queries.json``) and reports each fusion row's margin over each baseline with a 95% interval from a
paired bootstrap over reference images; ``--summarise DIR [DIR ...]`` pools finished runs (seeds).

It runs the train_fusion job's own loop pieces (:func:`visuray.fusion.loop.train_steps`,
:func:`~visuray.fusion.evaluate.evaluate`) in this process, without Ray, so the budget goes to the models.

    .venv/bin/python benchmarks/fusion_quality.py --catalog runs/catalogs/fashion-products \\
        --out runs/benchmarks/fusion_quality [--steps 150 --max-items 2500 --depths 1 2 4]
    # selection on validation (test lines untouched), one run per setting of the grid:
    .venv/bin/python benchmarks/fusion_quality.py --catalog runs/catalogs/fashion-products --steps 300 \\
        --max-items 1500 --val-fraction 0.2 --split val --composer-lr-scale 4 --out runs/benchmarks/fq_val/scale4
    # the whole catalog, two seeds, then pooled:
    .venv/bin/python benchmarks/fusion_quality.py --catalog runs/catalogs/fashion-products --steps 1000 \\
        --batch-size 64 --max-items 20000 --threads 1 --seed 0 --out runs/benchmarks/fq_full/seed0
    .venv/bin/python benchmarks/fusion_quality.py --summarise runs/benchmarks/fq_full/seed0 runs/benchmarks/fq_full/seed1

The pretrained start at the same budget (the whole catalog, 1,000 steps, batch 64). On one CPU core a
Lite0 step at batch 64 costs ~3.7 s (128 reference and target images through the frozen stages too) and
evaluation ~18 ms per image, so each run below (10 trained rows + ``image_only_as_is``) takes ~11-12 h;
two run side by side on a 2-core machine, one thread each (~23 h in all, longer when the cores are shared):

    # 1. validation, seed 0, one run per setting of the grid (both at once):
    .venv/bin/python benchmarks/fusion_quality.py --catalog runs/catalogs/fashion-products \\
        --image-backbone lite0 --steps 1000 --batch-size 64 --max-items 20000 --threads 1 --seed 0 \\
        --val-fraction 0.2 --split val --composer-lr-scale 1 --out runs/benchmarks/fq_lite0_val/scale1
    .venv/bin/python benchmarks/fusion_quality.py --catalog runs/catalogs/fashion-products \\
        --image-backbone lite0 --steps 1000 --batch-size 64 --max-items 20000 --threads 1 --seed 0 \\
        --val-fraction 0.2 --split val --composer-lr-scale 4 --out runs/benchmarks/fq_lite0_val/scale4
    # 2. test, once per seed (both at once), each row at its validation choice, e.g. if scale 4 won for tirg
    #    and maaf only: --composer-lr-scale 1 --override tirg.composer_lr_scale=4 maaf.composer_lr_scale=4
    .venv/bin/python benchmarks/fusion_quality.py --catalog runs/catalogs/fashion-products \\
        --image-backbone lite0 --steps 1000 --batch-size 64 --max-items 20000 --threads 1 --seed 0 \\
        [--override ...] --out runs/benchmarks/fq_lite0_full/seed0
    .venv/bin/python benchmarks/fusion_quality.py --catalog runs/catalogs/fashion-products \\
        --image-backbone lite0 --steps 1000 --batch-size 64 --max-items 20000 --threads 1 --seed 1 \\
        [--override ...] --out runs/benchmarks/fq_lite0_full/seed1
    # 3. pooled over both seeds' queries:
    .venv/bin/python benchmarks/fusion_quality.py --summarise runs/benchmarks/fq_lite0_full/seed0 \\
        runs/benchmarks/fq_lite0_full/seed1
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

BASELINES = ["image_only", "text_only", "concat", "tirg"]
FUSIONS = ["maaf", "residual"]
# The pretrained encoder's pooled features compared as they are (no step, identity projection): what plain
# visual search over the reference image returns. A baseline in the margins; only with a pretrained start.
AS_IS = "image_only_as_is"

# The settings that follow from where the image encoder starts (left unset on the command line):
# - vit-tiny: a 2-block ViT from random init at 64 px (16 px patches, 4 x 4 tokens), every block trained,
#   the residual fusion's text weight at 1 (there is no good image embedding to protect);
# - lite0: the train_fusion job's pretrained start (jobs/configs/train_fusion_lite0.yaml): ImageNet
#   EfficientNet-Lite0 at 128 px (4 x 4 tokens of 1280 channels, the demo's size: CPU-cheap), stem and
#   first 5 of 7 stages frozen, BatchNorm statistics held at the pretrained ones, residual weight 0.1.
BACKBONE_DEFAULTS: dict[str, dict[str, Any]] = {
    "vit-tiny": {"img_size": 64, "freeze_blocks": 0, "residual_init_weight": 1.0},
    "lite0": {"img_size": 128, "freeze_blocks": 5, "residual_init_weight": 0.1},
}


def is_baseline(name: str) -> bool:
    """Whether a row is one the fusion rows are measured against (margins, "best baseline")."""
    return name in BASELINES or name == AS_IS


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--catalog", help="fashion-products catalog (see the ingest job)")
    parser.add_argument(
        "--summarise",
        nargs="+",
        metavar="OUT_DIR",
        help="train nothing: merge finished runs (e.g. one per seed, same rows) into a table of means and "
        "paired margins pooled over all their queries; A+B joins part-runs of one seed (same split)",
    )
    parser.add_argument("--out", default="runs/benchmarks/fusion_quality", help="results.json + report.html")
    parser.add_argument("--steps", type=int, default=150, help="optimizer steps per model (same for all)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--max-items", type=int, default=2500, help="catalog subset (whole product lines)")
    parser.add_argument("--test-fraction", type=float, default=0.3, help="held-out product lines")
    parser.add_argument(
        "--image-backbone",
        choices=sorted(BACKBONE_DEFAULTS),
        default="vit-tiny",
        help="every row's image encoder: vit-tiny from random init (the earlier results), or lite0, the "
        "bundled ImageNet EfficientNet-Lite0 started as the train_fusion job starts it",
    )
    parser.add_argument("--img-size", type=int, help="default 64 (vit-tiny) / 128 (lite0)")
    parser.add_argument(
        "--patch-size", type=int, default=16, help="vit-tiny only: 16 px patches, 4 x 4 tokens at 64 px"
    )
    parser.add_argument("--vit-depth", type=int, default=2, help="vit-tiny only")
    parser.add_argument(
        "--freeze-blocks",
        type=int,
        help="image block groups (stem included) kept frozen: default 0 (vit-tiny) / 5 of 7 stages (lite0: "
        "each query costs two images' forward passes, and the early stages' ImageNet filters are generic)",
    )
    parser.add_argument(
        "--depths", type=int, nargs="+", default=[1, 2, 4], help="fusion depths of maaf/residual"
    )
    parser.add_argument(
        "--models",
        nargs="+",
        choices=BASELINES + FUSIONS + [AS_IS],
        help=f"rows; default all (with lite0 also {AS_IS}: the pretrained features untrained)",
    )
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=0.0,
        help="training product lines held out for validation (model selection); with --split val the "
        "models train without them and are scored on them, the test lines are never looked at",
    )
    parser.add_argument("--split", choices=["test", "val"], default="test", help="where rows are scored")
    parser.add_argument("--composer-lr-scale", type=float, default=1.0, help="lr multiplier of the composer")
    parser.add_argument(
        "--residual-init-weight",
        type=float,
        help="residual fusion only; default 1.0 (vit-tiny) / 0.1 (lite0)",
    )
    parser.add_argument(
        "--fusion-gate",
        action="store_true",
        help="maaf/residual rows with the preservation gate (model.fusion_gate); their names get +gate",
    )
    parser.add_argument("--text-depth", type=int, default=2)
    parser.add_argument(
        "--caption-vocab",
        metavar="FASHION_IQ_ROOT",
        help="also train the tokenizer's vocabulary on the human-written Fashion IQ captions (their train "
        "split, e.g. /work/shared/data/fashion-iq-captions): caption words then split into fewer pieces. "
        "The text encoder still trains on the templated queries only (there is no caption pretraining "
        "step), so this readies the vocabulary for real captions; it teaches the model nothing of them",
    )
    parser.add_argument("--fusion-dropout", type=float, default=0.1)
    parser.add_argument(
        "--override",
        nargs="*",
        default=[],
        metavar="ROW.KEY=VALUE",
        help="per-row settings chosen on validation, e.g. concat.lr=1e-3 maaf-d1.composer_lr_scale=4 "
        "(keys: lr, composer_lr_scale, residual_init_weight)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument(
        "--device",
        default="cpu",
        help="torch device of every model (cpu, cuda); the image cache stays on the host",
    )
    args = parser.parse_args()
    for key, value in BACKBONE_DEFAULTS[args.image_backbone].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.models is None:
        # The untrained row first: it costs an evaluation only, and is the floor every row must beat.
        args.models = ([AS_IS] if args.image_backbone == "lite0" else []) + BASELINES + FUSIONS
    if AS_IS in args.models and args.image_backbone == "vit-tiny":
        parser.error(f"{AS_IS} needs a pretrained image encoder (--image-backbone lite0)")
    return args


OVERRIDE_KEYS = ("lr", "composer_lr_scale", "residual_init_weight")


def overrides_of(args: argparse.Namespace, row: str) -> dict[str, float]:
    """The ``--override`` values for a row ("concat", "maaf-d1") or for every depth of a model ("maaf")."""
    picked: dict[str, float] = {}
    for item in args.override:
        target, _, value = item.partition("=")
        name, _, key = target.rpartition(".")
        if key not in OVERRIDE_KEYS or not value:
            raise SystemExit(f"bad --override {item!r}: want ROW.KEY=VALUE with KEY in {OVERRIDE_KEYS}")
        if name in (row, row.split("-d")[0]):
            picked[key] = float(value)
    return picked


def backbone_section(args: argparse.Namespace) -> dict[str, Any]:
    """The job config's ``model.backbone`` for ``--image-backbone``; BatchNorm statistics stay ``auto``
    (held at the pretrained ones when there are weights, as the job does)."""
    if args.image_backbone == "lite0":
        # The architecture and weights of jobs/configs/train_fusion_lite0.yaml; a CNN takes no ViT overrides.
        return {"name": "tf_efficientnet_lite0", "weights": "efficientnet_lite0", "img_size": args.img_size}
    return {
        "name": "vit_tiny_patch16_224",
        "weights": None,
        "img_size": args.img_size,
        "patch_size": args.patch_size,
        "depth": args.vit_depth,
    }


def config_for(
    args: argparse.Namespace, catalog: str, fusion: str, depth: int, override: dict[str, float] | None = None
) -> Any:
    """The train_fusion job config of one row (``fusion`` a job fusion name, not :data:`AS_IS`)."""
    from visuray.config import validate_config
    from visuray.fusion.config import FusionTrainConfig

    o = override or {}
    return validate_config(
        FusionTrainConfig,
        {
            "catalog": catalog,
            "output": "/unused",
            "data": {
                "max_items": args.max_items,
                "test_fraction": args.test_fraction,
                "val_fraction": args.val_fraction,
                "seed": args.seed,
            },
            "model": {
                "backbone": backbone_section(args),
                "text": {
                    "width": 128,
                    "depth": args.text_depth,
                    "heads": 4,
                    "max_length": 32,
                    "dropout": 0.1,
                },
                "fusion": fusion,
                "fusion_depth": depth,
                "fusion_dropout": args.fusion_dropout,
                "residual_init_weight": o.get("residual_init_weight", args.residual_init_weight),
                "fusion_gate": args.fusion_gate and fusion in FUSIONS,
            },
            "train": {
                "steps": args.steps,
                "batch_size": args.batch_size,
                "lr": o.get("lr", args.lr),
                "composer_lr_scale": o.get("composer_lr_scale", args.composer_lr_scale),
                "warmup_steps": max(1, args.steps // 10),
                "freeze_blocks": args.freeze_blocks,
                "seed": args.seed,
                "checkpoint_every": args.steps,
            },
            "eval": {"report_queries": 4, "report_top_k": 6},
        },
    )


def paired_margins(
    hit_ranks: dict[str, Any],
    clusters: list[str],
    ks: tuple[int, ...] = (1, 10, 50),
    n_boot: int = 1000,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Each fusion row's margin over each baseline row, R@k and (R@10+R@50)/2, with a 95% interval from
    a paired bootstrap over reference items (``clusters``): queries of one reference image share it and
    are not independent, so they are resampled together; both rows are scored on the same resample."""
    import numpy as np

    _, cluster_index = np.unique(np.asarray(clusters), return_inverse=True)
    n_clusters = int(cluster_index.max()) + 1 if len(clusters) else 0
    rng = np.random.default_rng(seed)
    # counts[b, c]: how often resample b draws cluster c; per-cluster sums make each resample a matmul.
    counts = np.stack(
        [np.bincount(rng.integers(0, n_clusters, n_clusters), minlength=n_clusters) for _ in range(n_boot)]
    )
    sizes = np.bincount(cluster_index, minlength=n_clusters)
    out: list[dict[str, Any]] = []
    for fusion in (name for name in hit_ranks if name.split("-d")[0] in FUSIONS):
        for baseline in (name for name in hit_ranks if is_baseline(name)):
            row: dict[str, Any] = {"model": fusion, "over": baseline}
            diffs = {}
            for k in ks:
                diff = (hit_ranks[fusion] < k).astype(float) - (hit_ranks[baseline] < k)
                diffs[f"R@{k}"] = diff
            if 10 in ks and 50 in ks:
                diffs["(R@10+R@50)/2"] = (diffs["R@10"] + diffs["R@50"]) / 2
            for metric, diff in diffs.items():
                per_cluster = np.bincount(cluster_index, weights=diff, minlength=n_clusters)
                boot = (counts @ per_cluster) / (counts @ sizes)
                lo, hi = np.percentile(boot, [2.5, 97.5])
                row[metric] = {"margin": float(diff.mean()), "ci95": [float(lo), float(hi)]}
            out.append(row)
    return out


def margins_table(margins: list[dict[str, Any]]) -> list[str]:
    """Markdown lines: margin [95% interval] of each fusion row over each baseline."""
    if not margins:
        return []
    metrics = [k for k in margins[0] if k not in ("model", "over")]
    lines = ["| model | over | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
    for m in margins:
        cells = [f"{m[k]['margin']:+.3f} [{m[k]['ci95'][0]:+.3f}, {m[k]['ci95'][1]:+.3f}]" for k in metrics]
        lines.append(f"| {m['model']} | {m['over']} | " + " | ".join(cells) + " |")
    return lines


def summarise(run_dirs: list[str]) -> list[str]:
    """Markdown: each row's mean over the runs (and R@10 per run), then every fusion row's margins over
    every baseline, bootstrapped over the queries of all runs together (a reference image of run i is
    the cluster ``i:<id>``: runs with other seeds split the catalog differently)."""
    import numpy as np

    # "A+B+C": part-runs of one seed (other rows, same split and queries) read as one run.
    groups = [[Path(part) for part in d.split("+")] for d in run_dirs]
    for parts in groups:
        if len({(p / "queries.json").read_text() for p in parts}) != 1:
            raise SystemExit(f"{'+'.join(map(str, parts))}: the parts were scored on different queries")
    results = [
        {"rows": [r for p in parts for r in json.loads((p / "results.json").read_text())["rows"]]}
        for parts in groups
    ]
    names = [
        r["model"]
        for r in results[0]["rows"]
        if all(r["model"] in {x["model"] for x in o["rows"]} for o in results)
    ]
    lines = [
        f"runs: {', '.join(run_dirs)}",
        "| model | R@1 | R@10 | R@50 | (R@10+R@50)/2 | R@10 per run |",
        "|---|---|---|---|---|---|",
    ]
    for name in names:
        rows = [next(x for x in o["rows"] if x["model"] == name) for o in results]
        mean = {k: float(np.mean([x[k] for x in rows])) for k in ("R@1", "R@10", "R@50", "(R@10+R@50)/2")}
        per_run = " / ".join(f"{x['R@10']:.3f}" for x in rows)
        lines.append(
            f"| {name} | {mean['R@1']:.3f} | {mean['R@10']:.3f} | {mean['R@50']:.3f} | "
            f"{mean['(R@10+R@50)/2']:.3f} | {per_run} |"
        )
    hit_ranks: dict[str, list[Any]] = {name: [] for name in names}
    clusters: list[str] = []
    for i, parts in enumerate(groups):
        ranks: dict[str, Any] = {}
        for part in parts:
            with np.load(part / "hit_ranks.npz") as saved:
                ranks.update({name: saved[name] for name in saved.files})
        for name in names:
            hit_ranks[name].append(ranks[name])
        clusters += [f"{i}:{q['reference_id']}" for q in json.loads((parts[0] / "queries.json").read_text())]
    pooled = {name: np.concatenate(parts) for name, parts in hit_ranks.items()}
    lines += ["", "paired margins, all runs' queries pooled (95% cluster-bootstrap interval):"]
    lines += margins_table(paired_margins(pooled, clusters))
    return lines


def main() -> None:
    import numpy as np
    import torch

    from visuray.catalog.readers import load_catalog_frame
    from visuray.fusion.data import ImageTensorCache, build_fusion_data, load_items, prepare_tokenizer
    from visuray.fusion.datasets import TEMPLATED_TEXT_NOTE, read_fashion_iq
    from visuray.fusion.evaluate import evaluate
    from visuray.fusion.html_report import comparison_table, render_report
    from visuray.fusion.loop import (
        build_objective,
        image_backbone,
        init_pretrained_parts,
        optimizer_for,
        train_steps,
    )
    from visuray.models.backbone import create_backbone
    from visuray.models.embedding import orthonormal_projection_
    from visuray.models.weights import check_pretrained, prepare_for_training

    args = parse_args()
    if args.summarise:
        for line in summarise(args.summarise):
            print(line)
        return
    if not args.catalog:
        raise SystemExit("--catalog is required (unless --summarise)")
    if args.split == "val" and args.val_fraction <= 0:
        raise SystemExit("--split val needs --val-fraction > 0")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = config_for(args, args.catalog, "maaf", 1)
    started = time.monotonic()
    # As the job's driver does: the weights are read and checked once, and their own mean and std
    # recorded (ImageNet's for random init), before any row is built from them.
    backbone = check_pretrained(base.model.backbone, base.storage)
    items, texts = load_items(args.catalog, base.data)
    if args.caption_vocab:
        # Each caption on its own: joined pairs would make the joining "and" the commonest word.
        texts += [c for t in read_fashion_iq(args.caption_vocab, "train") for c in t.captions if c.strip()]
    data = build_fusion_data(items, base.data)
    tokenizer = prepare_tokenizer(base, texts, data)
    cache = ImageTensorCache(args.catalog, data.all_ids(), backbone.input_spec)
    setup_s = time.monotonic() - started
    scored_items, scored_queries = data.held_out(args.split)
    print(
        f"{len(data.train_items)} train / {len(data.val_items)} val / {len(data.test_items)} test items, "
        f"{len(data.train_queries)} train / {len(data.val_queries)} val / {len(data.test_queries)} test "
        f"queries; scored on {args.split}; vocab {tokenizer.vocab_size}, {args.image_backbone} at "
        f"{args.img_size} px, setup {setup_s:.0f}s",
        flush=True,
    )

    runs = [(m, 0) for m in args.models if is_baseline(m)]
    runs += [(m, d) for m in args.models if m in FUSIONS for d in args.depths]
    rows: list[dict[str, Any]] = []
    examples_of: dict[str, Any] = {}
    hit_ranks: dict[str, Any] = {}
    for fusion, depth in runs:
        name = fusion if depth == 0 else f"{fusion}-d{depth}" + ("+gate" if args.fusion_gate else "")
        override = overrides_of(args, name)
        cfg = config_for(
            args, args.catalog, "image_only" if fusion == AS_IS else fusion, max(depth, 1), override
        )
        cfg.model.backbone = backbone
        cfg.model.text.vocab_size = tokenizer.vocab_size
        if fusion == AS_IS:  # the embedding is the pooled features themselves
            cfg.model.embed_dim = create_backbone(backbone).num_features
        torch.manual_seed(args.seed)
        objective = build_objective(cfg)
        # The job's start of a fresh run: starting weights (none for random init), then the frozen
        # blocks and the BatchNorm policy.
        init_pretrained_parts(objective.model, cfg)
        prepare_for_training(
            objective.model.image_encoder.backbone,
            image_backbone(cfg),
            resumed=True,
            freeze_blocks=cfg.train.freeze_blocks,
        )
        if fusion == AS_IS:  # width -> width: the identity, so ranking is by the pooled features as they are
            orthonormal_projection_(objective.model.target_projection, torch.Generator().manual_seed(0))
        objective.to(args.device)
        losses: list[float] = []
        t0 = time.monotonic()
        if fusion != AS_IS:
            train_steps(
                objective,
                optimizer_for(objective, cfg.train),
                data.train_queries,
                cache,
                tokenizer,
                cfg.train,
                0,
                args.device,
                lambda step, loss, lr, losses=losses: losses.append(float(loss)),
            )
        train_s = time.monotonic() - t0
        held_out = evaluate(objective.model, cache, tokenizer, data, cfg.eval, args.split)
        eval_s = time.monotonic() - t0 - train_s
        hit_ranks[name] = held_out.hit_ranks
        examples = held_out.examples
        m = {k.split("/", 1)[1]: v for k, v in held_out.metrics.items()}
        row = {
            "model": name,
            "split": args.split,
            "override": override,
            "R@1": m["recall@1"],
            "R@10": m["recall@10"],
            "R@50": m["recall@50"],
            "(R@10+R@50)/2": m["fiq_score"],
            "variant R@10": m.get("kind/colour_variant/recall@10", float("nan")),
            "type+colour R@10": m.get("kind/type_colour/recall@10", float("nan")),
            "CFQ caption AUC": m.get("cfq/caption_auc", float("nan")),
            "CFQ image AUC": m.get("cfq/image_auc", float("nan")),
            "final loss": sum(losses[-10:]) / len(losses[-10:]) if losses else float("nan"),
            "train s": round(train_s, 1),
            "s/step": round(train_s / len(losses), 3) if losses else float("nan"),
            "eval s": round(eval_s, 1),
            "params (M)": round(sum(p.numel() for p in objective.parameters()) / 1e6, 2),
        }
        rows.append(row)
        examples_of[name] = examples
        print(json.dumps(row), flush=True)
        # Per-query first-hit ranks, rewritten after every row so that a cut-short grid keeps its rows.
        np.savez(out / "hit_ranks.npz", **hit_ranks)
    (out / "queries.json").write_text(
        json.dumps([{"reference_id": q.reference_id, "kind": q.kind} for q in scored_queries])
    )

    baseline_rows = [r for r in rows if is_baseline(r["model"])]
    for row in rows:
        if not is_baseline(row["model"]) and baseline_rows:  # a run of fusion rows only has no margins
            for k in ("R@10", "R@50"):
                row[f"{k} - best baseline"] = row[k] - max(r[k] for r in baseline_rows)
    margins = paired_margins(hit_ranks, [q.reference_id for q in scored_queries], seed=args.seed)
    for line in margins_table(margins):
        print(line)
    total_s = time.monotonic() - started
    summary = {
        "note": TEMPLATED_TEXT_NOTE,
        "budget": {k: v for k, v in vars(args).items() if k not in ("catalog", "out")},
        "data": {
            "train_items": len(data.train_items),
            "val_items": len(data.val_items),
            "test_items": len(data.test_items),
            "train_queries": len(data.train_queries),
            "val_queries": len(data.val_queries),
            "test_queries": len(data.test_queries),
            "scored_on": args.split,
            "scored_items": len(scored_items),
            "scored_queries": len(scored_queries),
        },
        "total_s": round(total_s, 1),
        "rows": rows,
        "paired_margins": margins,
    }
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    columns = list(rows[0]) + ["R@10 - best baseline", "R@50 - best baseline"]
    wanted = {e["reference_id"] for ex in examples_of.values() for e in ex} | {
        i for ex in examples_of.values() for e in ex for i in e["top_ids"]
    }
    frame = load_catalog_frame(args.catalog, columns=["item_id", "image"])
    images = {i: b for i, b in zip(frame["item_id"], frame["image"], strict=True) if i in wanted}
    best = max(
        (r for r in rows if not is_baseline(r["model"])), key=lambda r: r["(R@10+R@50)/2"], default=rows[0]
    )
    html = render_report(
        title=f"Composed retrieval benchmark (fashion-products, {args.split} product lines)",
        metrics={},
        examples=examples_of[best["model"]],
        images=images,
        notes=[
            TEMPLATED_TEXT_NOTE,
            f"budget: {summary['budget']}; total {total_s:.0f}s; examples from {best['model']}",
        ],
        extra_html=comparison_table(rows, columns),
    )
    (out / "report.html").write_text(html)
    print(f"total {total_s:.0f}s; wrote {out / 'results.json'} and {out / 'report.html'}")


if __name__ == "__main__":
    main()
