"""A margin and mining sweep of the finetune job on fashion-products, with ASHA and without it.

Protocol
--------
Data: the fashion-products catalog ingested as in ``finetune_quality.py`` (label = ``articleType``).
Article types with at least ``--min-class`` photos, sorted by name, are dealt in turn to four piles:
piles 0 and 2 are **training** types, pile 1 **validation** types, pile 3 **test** types (class-disjoint:
no validation or test type is ever trained on, and the sweep never sees a test photo). Three catalogs
are written: train (at most ``--per-class`` photos per type), val and test (at most ``--per-class-eval``).

The sweep (``jobs/configs/sweep_finetune_margin.yaml``, paths and budget overridden here): the finetune
job (``jobs/configs/finetune_lite0.yaml``: ViT-tiny, 2 blocks, 64 px, P x K = 8 x 4) with the triplet
loss, ``loss.margin`` log-uniform in [0.02, 0.5] and ``loss.miner`` in {batch_all, batch_hard,
semi_hard}; ``--trials`` trials drawn with seed 0, each trained for ``--steps`` steps and validated
every ``--val-every`` steps (leave-one-out Recall@1 / MAP@R on the validation catalog); ranked by
``val/map@r``. It runs twice with the same seed, hence the same trials: with ASHA (grace period
``--val-every`` steps, reduction factor 2) and with FIFO (every trial trained to the end).

Reported: per sweep, the steps trained in total, the wall time, the best trial and its validation MAP@R
(compute to reach the best: ASHA against no early stopping, same trials). Then the test split: the
ASHA sweep's best model and the default config (``finetune_lite0.yaml``'s multi-similarity loss,
same budget, trained by the same job) against raw pixels, leave-one-out Recall@1 / MAP@R on test types.

Run:  python benchmarks/sweep_margin.py /work/shared/data/fashion-products [--work runs/bench-sweep]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from finetune_quality import (  # noqa: E402
    capped_rows,
    eligible_classes,
    embed,
    ingest_fashion_products,
    metrics_row,
)


def split_catalogs(catalog: str, work: Path, min_class: int, per_class: int, per_class_eval: int) -> dict:
    """Write the train / val / test catalogs (class-disjoint by article type) under ``work``."""
    from visuray.catalog.readers import CatalogRows
    from visuray.catalog.schema import CatalogRecord, write_catalog

    rows = CatalogRows(catalog)
    eligible = eligible_classes(rows, min_class)
    piles = {"train": eligible[0::4] + eligible[2::4], "val": eligible[1::4], "test": eligible[3::4]}
    caps = {"train": per_class, "val": per_class_eval, "test": per_class_eval}
    out = {}
    for split, classes in piles.items():
        uri = work / f"catalog-{split}"
        out[split] = str(uri)
        if (uri / "LATEST").exists():
            continue
        records = [
            CatalogRecord(
                item_id=rows.item_ids[i],
                image=rows.image_bytes(i),
                label=rows.label_names[rows.labels[i]],
                category=rows.category_names[rows.categories[i]] if rows.categories[i] >= 0 else None,
                title=rows.titles[i],
            )
            for i in capped_rows(rows.labels, classes, caps[split])
        ]
        write_catalog(records, str(uri))
    return out


def sweep_overrides(catalogs: dict, work: Path, args: Any) -> list[str]:
    """The job-spec overrides every trial and the default run share: data, budget, validation."""
    return [
        f"catalog={catalogs['train']}",
        f"validation.catalog={catalogs['val']}",
        f"validation.every={args.val_every}",
        f"train.steps={args.steps}",
        f"train.warmup_steps={max(1, args.steps // 10)}",
        f"train.checkpoint_every={args.steps}",
        f"train.log_every={args.val_every}",
        "model.embedding_dim=64",
    ]


def run_sweep_once(scheduler: str, catalogs: dict, work: Path, args: Any) -> tuple[dict, Any]:
    import pandas as pd

    from visuray.config import load_config
    from visuray.sweep.config import SweepConfig
    from visuray.sweep.run import run_sweep

    cfg = load_config(
        SweepConfig,
        REPO / "jobs/configs/sweep_finetune_margin.yaml",
        [
            f"name=margin-{scheduler}",
            f"output={work / 'sweeps'}",
            f"num_samples={args.trials}",
            f"scheduler.name={scheduler}",
            f"scheduler.grace_period={args.val_every}",
            f"overrides={json.dumps([*sweep_overrides(catalogs, work, args), 'loss.name=triplet'])}",
        ],
    )
    started = time.monotonic()
    summary = run_sweep(cfg)
    summary["wall_s"] = round(time.monotonic() - started, 1)
    table = pd.read_parquet(Path(summary["sweep"]) / "results.parquet")
    return summary, table


def train_default(catalogs: dict, work: Path, args: Any) -> str:
    """The default config (the spec's own loss) at the same budget, trained by the same job."""
    from visuray.jobspec import load_job_spec

    output = work / "model-default"
    if not (output / "LATEST").exists():
        kind, cfg = load_job_spec(
            REPO / "jobs/configs/finetune_lite0.yaml",
            [
                *sweep_overrides(catalogs, work, args),
                f"output={output}",
                "name=sweep-bench-default",
                f"run_dir={work / 'train-default'}",
            ],
        )
        kind.run(cfg)
    return str(output)


def test_rows(catalogs: dict, models: dict[str, str]) -> list[dict[str, Any]]:
    from visuray.catalog.readers import CatalogRows
    from visuray.evaluation.baselines import raw_pixel_embedding
    from visuray.models.embedding import load_embedding_model

    rows = CatalogRows(catalogs["test"])
    images = [rows.image_bytes(i) for i in range(len(rows))]
    out = [{"embedding": "raw pixels (16x16 RGB)", **metrics_row(raw_pixel_embedding(images), rows.labels)}]
    for name, uri in models.items():
        model, artifact = load_embedding_model(uri)
        vectors = embed(model.eval(), images, int(artifact.manifest.metadata["img_size"]))
        out.append({"embedding": name, **metrics_row(vectors, rows.labels)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", help="the fashion-products folder (images/ and metadata.csv)")
    parser.add_argument("--work", default="runs/bench-sweep")
    parser.add_argument("--min-class", type=int, default=20)
    parser.add_argument("--per-class", type=int, default=40)
    parser.add_argument("--per-class-eval", type=int, default=40)
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--val-every", type=int, default=40)
    parser.add_argument("--num-cpus", type=int, default=None, help="logical CPUs of the embedded Ray cluster")
    args = parser.parse_args()

    from visuray.cluster import ensure_ray

    work = Path(args.work).absolute()
    work.mkdir(parents=True, exist_ok=True)
    catalogs = split_catalogs(
        ingest_fashion_products(args.data, work), work, args.min_class, args.per_class, args.per_class_eval
    )
    ensure_ray(num_cpus=args.num_cpus)
    results = {}
    for scheduler in ("asha", "fifo"):
        summary, table = run_sweep_once(scheduler, catalogs, work, args)
        results[scheduler] = summary
        print(f"\n== sweep with {scheduler}: {summary['steps_trained']} steps, {summary['wall_s']} s")
        print(table.drop(columns=["model", "error"]).to_string(index=False))
    same = results["asha"]["best"] and results["fifo"]["best"]
    print("\n| sweep | trials | stopped early | steps trained | wall (s) | best trial | best val/map@r |")
    print("|---|---|---|---|---|---|---|")
    for scheduler, s in results.items():
        best = s["best"] or {}
        print(
            f"| {scheduler} | {s['trials']} | {s['stopped_early']} | {s['steps_trained']} | {s['wall_s']} | "
            f"{best.get('values')} | {best.get('val/map@r', float('nan')):.4f} |"
        )
    if same:
        ratio = results["asha"]["steps_trained"] / results["fifo"]["steps_trained"]
        print(
            f"ASHA / FIFO steps trained: {ratio:.2f}; wall: {results['asha']['wall_s'] / results['fifo']['wall_s']:.2f}"
        )

    models = {"default config (multi-similarity)": train_default(catalogs, work, args)}
    if results["asha"]["best"]:
        models["best of the ASHA sweep"] = results["asha"]["best"]["model"]
    print("\n| test split (class-disjoint) | Recall@1 | MAP@R |\n|---|---|---|")
    for row in test_rows(catalogs, models):
        print(f"| {row['embedding']} | {row['recall@1']:.3f} | {row['map@r']:.3f} |")


if __name__ == "__main__":
    main()
