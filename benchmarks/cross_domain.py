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
  mapped class is the query's), chunked FAISS.
- Rows: raw pixels, random init, SSL only (``--ssl-model``), and trained on the catalog (every article
  type with at least ``--min-class`` photos, ``--per-class`` each) with the same budget (ViT-tiny,
  ``--depth`` blocks, ``--img-size`` px, P x K = 8 x 4, ``--steps`` steps): triplet (batch-all) and the
  adaptive triplet loss (title clusters, batch-all). Training as in ``finetune_quality.py``.

Run:  python benchmarks/cross_domain.py /work/shared/data/fashion-products /work/shared/data/clothing-small
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from finetune_quality import (
    baseline_embedders,
    capped_rows,
    embed,
    ingest_fashion_products,
    model_config,
    print_table,
    train_in_process,
    training_subset,
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
TRAINED_ROWS = {
    "triplet batch-all": {"name": "triplet", "miner": "batch_all"},
    "ATL (title clusters)": {"name": "adaptive_triplet", "miner": "batch_all", "margin": 0.1},
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
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--min-class", type=int, default=20)
    parser.add_argument("--per-class", type=int, default=40, help="catalog photos per article type")
    parser.add_argument("--ssl-model", default=None)
    parser.add_argument("--init-from-ssl", action="store_true")
    parser.add_argument("--rows", nargs="*", default=list(TRAINED_ROWS))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch

    from visuray.catalog.readers import CatalogRows
    from visuray.evaluation.retrieval import retrieval_metrics

    torch.set_num_threads(args.threads)
    started = time.monotonic()
    work = Path(args.work).absolute()
    work.mkdir(parents=True, exist_ok=True)
    catalog = ingest_fashion_products(args.catalog_data, work)
    rows = CatalogRows(catalog)
    counts = np.bincount([label for label in rows.labels if label >= 0], minlength=len(rows.label_names))
    classes = [c for c in range(len(counts)) if counts[c] >= args.min_class or gallery_label(rows.label_names[c])
               in CLASS_MAP]  # fmt: skip
    gallery_rows = capped_rows(rows.labels, classes, args.per_class)
    gallery_images = [rows.image_bytes(i) for i in gallery_rows]
    gallery_labels = [gallery_label(rows.label_names[rows.labels[i]]) for i in gallery_rows]
    query_images, query_labels = street_queries(Path(args.street_data), args.split)
    print(f"{len(query_images)} street queries against {len(gallery_images)} catalog photos "
          f"({sum(not g.startswith('other:') for g in gallery_labels)} in mapped classes)")  # fmt: skip
    model_cfg = model_config(args.img_size, args.depth)

    def score(name: str, embedder) -> dict:  # noqa: ANN001
        m = retrieval_metrics(embedder(query_images), query_labels, embedder(gallery_images), gallery_labels,
                              ks=(1, 5, 10))  # fmt: skip
        row = {
            "embedding": name,
            **{k: round(m[k], 4) for k in ("recall@1", "recall@5", "recall@10", "map@r")},
        }
        print(row, flush=True)
        return row

    results = [score(name, embedder) for name, embedder in baseline_embedders(model_cfg, args).items()]
    subset = training_subset(rows, gallery_rows)
    for name in args.rows:
        model = train_in_process(catalog, rows, subset, model_cfg, TRAINED_ROWS[name], args)
        results.append(score(name, lambda images, m=model: embed(m, images, args.img_size)))

    print_table(f"street -> catalog, {args.steps} steps, {args.img_size} px, depth {args.depth}", results,
                ["recall@1", "recall@5", "recall@10", "map@r"])  # fmt: skip
    print(f"\ntotal wall time {time.monotonic() - started:.0f} s")
    (work / "cross_domain.json").write_text(json.dumps({"args": vars(args), "rows": results}, indent=1))


if __name__ == "__main__":
    main()
