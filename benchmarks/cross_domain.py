"""Cross-domain retrieval: street photos (clothing-small) as queries against the fashion-products catalog.

Protocol
--------
- Gallery: the fashion-products catalog (studio photos), at most ``--per-class`` photos per article type
  (catalog order), ingested with the project's ingest job (see ``finetune_quality.py``).
- Queries: every photo of the ``--split`` folder of clothing-small (street photos, 10 classes).
- A retrieved catalog photo is correct when its article type maps to the query's class:

  ============  ==========================================================================
  street class  catalog article types
  ============  ==========================================================================
  dress         Dresses
  hat           Caps, Hat
  longsleeve    Sweatshirts, Sweaters
  outwear       Jackets
  pants         Trousers, Track Pants, Jeans
  shirt         Shirts
  shoes         Casual Shoes, Sports Shoes, Formal Shoes, Heels, Flats, Sandals, Sports Sandals
  shorts        Shorts
  skirt         Skirts
  t-shirt       Tshirts
  ============  ==========================================================================

  Catalog photos of any other article type stay in the gallery as distractors (they match no query).
- Metrics: Recall@1/5/10 and MAP@R with a query/gallery split (R = the number of gallery photos whose
  mapped class is the query's), chunked FAISS (:func:`visuray.evaluation.retrieval.retrieval_metrics`);
  per query hit@1 and AP@R (``finetune_quality.per_query_metrics``, means checked against it) for each
  trained row's margin over every other row with a paired 95% interval (bootstrap over the street
  queries, one resample set for both rows, seed fixed).
- Backbones, rows and budget as in ``finetune_quality.py`` (``--backbone lite0`` by default: the bundled
  ImageNet EfficientNet-Lite0 at ``--img-size`` 160, ``--freeze-blocks`` 3; ``--backbone vit-tiny``: the
  earlier random-init ViT-tiny protocol): raw pixels, random init (same architecture, seed 0), pretrained
  as is (pooled features), SSL only (``--ssl-model``), and trained on the catalog (the gallery photos:
  every article type with at least ``--min-class`` photos or a mapped one, ``--per-class`` each) with the
  same budget for every trained row (``--rows``; default: multi-similarity, the finetune job's default
  objective). No street photo is trained on; the settings are those chosen on fashion-products'
  training classes (``finetune_quality.py --validate``: lr 3e-5, 1280-d orthonormal start, 400 photos per type), not on
  street photos.

Run:  python benchmarks/cross_domain.py /work/shared/data/fashion-products /work/shared/data/clothing-small \
          --lr 3e-5 --embedding-dim 1280 --projection-init orthonormal --per-class 400
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from finetune_quality import (
    N_BOOT,
    capped_rows,
    describe_budget,
    evaluate_rows,
    ingest_fashion_products,
    load_note,
    margins_markdown,
    margins_over,
    markdown_table,
    model_config,
    protocol_arguments,
    run_stem,
    score,
    training_subset,
    with_backbone_defaults,
)

CLASS_MAP = {
    "dress": ["Dresses"],
    "hat": ["Caps", "Hat"],
    "longsleeve": ["Sweatshirts", "Sweaters"],
    "outwear": ["Jackets"],
    "pants": ["Trousers", "Track Pants", "Jeans"],
    "shirt": ["Shirts"],
    "shoes": ["Casual Shoes", "Sports Shoes", "Formal Shoes", "Heels", "Flats", "Sandals", "Sports Sandals"],
    "shorts": ["Shorts"],
    "skirt": ["Skirts"],
    "t-shirt": ["Tshirts"],
}


def gallery_label(article_type: str) -> str:
    """The street class an article type maps to, or a label no query has."""
    for street, types in CLASS_MAP.items():
        if article_type in types:
            return street
    return f"other:{article_type}"


def street_queries(root: Path, split: str) -> tuple[list[bytes], list[str]]:
    paths = sorted(p for p in (root / split).glob("*/*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    unknown = {p.parent.name for p in paths} - set(CLASS_MAP)
    if unknown:
        raise SystemExit(f"street classes without a catalog mapping: {sorted(unknown)}")
    return [p.read_bytes() for p in paths], [p.parent.name for p in paths]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("catalog_data", help="the fashion-products folder")
    parser.add_argument("street_data", help="the clothing-small folder (train/validation/test class folders)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--work", default="runs/bench")
    parser.add_argument("--min-class", type=int, default=20)
    parser.add_argument("--per-class", type=int, default=40, help="catalog photos per article type")
    protocol_arguments(parser)
    args = with_backbone_defaults(parser.parse_args())

    import torch

    from visuray.catalog.readers import CatalogRows

    torch.set_num_threads(args.threads)
    started = time.monotonic()
    work = Path(args.work).absolute()
    work.mkdir(parents=True, exist_ok=True)
    catalog = ingest_fashion_products(args.catalog_data, work)
    rows = CatalogRows(catalog)
    counts = np.bincount([label for label in rows.labels if label >= 0], minlength=len(rows.label_names))
    classes = [
        c
        for c in range(len(counts))
        if counts[c] >= args.min_class or gallery_label(rows.label_names[c]) in CLASS_MAP
    ]
    gallery_rows = capped_rows(rows.labels, classes, args.per_class)
    gallery_images = [rows.image_bytes(i) for i in gallery_rows]
    gallery_labels = [gallery_label(rows.label_names[rows.labels[i]]) for i in gallery_rows]
    query_images, query_labels = street_queries(Path(args.street_data), args.split)
    mapped = sum(not g.startswith("other:") for g in gallery_labels)
    print(
        f"{len(query_images)} street queries ({args.split}) against {len(gallery_images)} catalog photos "
        f"({mapped} in mapped classes); {load_note()}"
    )
    model_cfg = model_config(args)
    budget = describe_budget(args, model_cfg)
    print(budget, flush=True)
    per_query: dict[str, dict[str, np.ndarray]] = {}

    def evaluate(name: str, embedder: Callable[[list[bytes]], np.ndarray]) -> dict[str, Any]:
        m, per_query[name] = score(
            embedder(query_images), query_labels, embedder(gallery_images), gallery_labels, (1, 5, 10), name
        )
        return {
            "embedding": name,
            **{k: round(m[k], 4) for k in ("recall@1", "recall@5", "recall@10", "map@r")},
        }

    results, trained = evaluate_rows(catalog, training_subset(rows, gallery_rows), model_cfg, args, evaluate)

    margins = margins_over(per_query, trained, f"street {args.split}")
    print(f"\nstreet ({args.split}) -> catalog; {budget}\n")
    print(markdown_table(results, ["recall@1", "recall@5", "recall@10", "map@r", "train_s"]))
    print(f"\nmargins, paired bootstrap over queries ({N_BOOT} resamples)\n")
    print(margins_markdown(margins))
    print(f"\ntotal wall time {time.monotonic() - started:.0f} s; {load_note()}")
    stem = run_stem(f"cross_domain_{args.split}", args)
    (work / f"{stem}.json").write_text(
        json.dumps({"args": vars(args), "budget": budget, "rows": results, "margins": margins}, indent=1)
    )
    np.savez(
        work / f"{stem}_per_query.npz",
        **{f"{name} {key}": v for name, d in per_query.items() for key, v in d.items()},
    )


if __name__ == "__main__":
    main()
