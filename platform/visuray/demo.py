"""The main job, end to end on one machine: ingest → train → index → serve → query over HTTP → report.

Everything is real and local: an embedded Ray cluster, local storage under ``--output``, the Serve
application on loopback, and HTTP requests with real image uploads. The budget (tiny ViT, 64 px, a few
hundred steps) fits in a few minutes on 2 CPU cores; on a GPU machine raise ``--steps``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# A tiny ViT: 2 blocks at 64 px with 8 px patches (64 tokens) trains at a few steps per second on CPU.
DEMO_MODEL = {
    "backbone": {"name": "vit_tiny_patch16_224", "img_size": 64, "patch_size": 8, "depth": 2},
    "embedding_dim": 64,
}
# Multi-similarity from random init: on this sample (10 classes x 30 street photos) batch-hard triplets
# collapse (every embedding the same point) and batch-all learns slowly; 400 steps at lr 1e-3 measured
# leave-one-out Recall@1 0.20 / MAP@R 0.061 against 0.18 / 0.037 for the random-init network and
# 0.30 / 0.062 for raw pixels (benchmarks/README.md): better than random init, not better than pixels.
DEMO_STEPS = 400
DEMO_TRAIN = {"lr": 1e-3, "warmup_steps": 40}
DEMO_LOSS = {"name": "multi_similarity"}
NEIGHBOURS = 5
# The attribute stage trains two small models in-process (attention and pooled baseline); 60 steps keeps
# it to about a minute on 2 cores.
ATTRIBUTE_STEPS = 60


@dataclass
class DemoOptions:
    output: str = "demo-output"
    port: int = 8000
    steps: int | None = None
    num_cpus: int | None = None


def _banner(text: str) -> None:
    log.info("=" * 20 + " %s " + "=" * 20, text)


def _query_images(query_dir: Path) -> list[tuple[str, Path]]:
    """(expected label, path) for every bundled query image; the folder name is the label."""
    return [(p.parent.name, p) for p in sorted(query_dir.glob("*/*.jpg"))]


def run_demo(opts: DemoOptions) -> dict[str, Any]:
    import httpx

    from visuray.attributes.demo_stage import run_demo_attribute_stage
    from visuray.catalog.ingest import IngestConfig, run_ingest
    from visuray.catalog.sample import bundled_query_dir, bundled_sample_dir
    from visuray.cluster import ensure_ray
    from visuray.index.build import BuildIndexConfig, run_build_index
    from visuray.report import QueryResult, baseline_table, write_report
    from visuray.serving import AttributesArgs, ServeAppArgs, start_serve_app
    from visuray.train.finetune import FinetuneConfig, run_finetune

    started = time.monotonic()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request would drown the output
    out = Path(opts.output).absolute()
    out.mkdir(parents=True, exist_ok=True)
    catalog_uri, model_uri, index_uri = str(out / "catalog"), str(out / "model"), str(out / "index")
    # Logical CPUs above the 2 physical cores so trainer, data pool and replicas can coexist.
    ensure_ray(num_cpus=opts.num_cpus or 4)

    _banner("1/6 ingest the bundled sample (clothing-small, CC0)")
    ingest = run_ingest(IngestConfig(source=str(bundled_sample_dir()), output=catalog_uri))
    log.info("catalog: %s items, %s skipped", ingest.get("num_ok"), ingest.get("num_skipped"))

    _banner("2/6 train the embedding model (multi-similarity loss, P x K batches)")
    steps = opts.steps or DEMO_STEPS
    train_cfg = FinetuneConfig.model_validate(
        {
            "name": "demo-finetune",
            "catalog": catalog_uri,
            "output": model_uri,
            "run_dir": str(out / "train-runs"),
            "model": DEMO_MODEL,
            "train": {
                **DEMO_TRAIN,
                "steps": steps,
                "warmup_steps": min(DEMO_TRAIN["warmup_steps"], steps // 5),
                "checkpoint_every": max(steps // 2, 1),
                "log_every": 25,
            },
            "loss": DEMO_LOSS,
        }
    )
    train = run_finetune(train_cfg)

    _banner("3/6 train the attribute model (channel attention) beside its pooled baseline")
    attributes = run_demo_attribute_stage(catalog_uri, str(out / "attributes"), ATTRIBUTE_STEPS)
    log.info(
        "attributes: macro AUC %.3f (pooled baseline %.3f) on held-out photos",
        attributes["mean_auc"],
        attributes["baseline_mean_auc"],
    )

    _banner("4/6 build the FAISS index (Ray Data batch embedding)")
    index = run_build_index(BuildIndexConfig(catalog=catalog_uri, model=model_uri, output=index_uri))

    _banner("5/6 start the Serve application and query it over HTTP")
    url = start_serve_app(
        ServeAppArgs(
            model=model_uri,
            index=index_uri,
            catalog=catalog_uri,
            attributes=AttributesArgs(model=attributes["model"]),
        ),
        host="127.0.0.1",
        port=opts.port,
        access_log=False,
    )
    results: list[QueryResult] = []
    try:
        with httpx.Client(base_url=url, timeout=60) as client:
            models = client.get("/v1/models").raise_for_status().json()
            for expected, path in _query_images(bundled_query_dir()):
                resp = client.post(
                    "/v1/search",
                    files={"image": (path.name, path.read_bytes(), "image/jpeg")},
                    data={"k": str(NEIGHBOURS)},
                )
                resp.raise_for_status()
                hits = resp.json()["results"]
                images = [
                    client.get(f"/v1/items/{h['item_id']}/image").raise_for_status().content for h in hits
                ]
                predicted = (
                    client.post(
                        "/v1/attributes", files={"image": (path.name, path.read_bytes(), "image/jpeg")}
                    )
                    .raise_for_status()
                    .json()["labels"]
                )
                labels = [f"{a['label']} {a['score']:.2f}" for a in predicted]
                results.append(QueryResult(path.name, expected, path.read_bytes(), hits, images, labels))
                shown = ", ".join(f"{h['label']}({h['score']:.2f})" for h in hits)
                print(f"query {expected:>10} {path.name[:12]:<12} -> {shown}", flush=True)
                print(f"      attributes: {', '.join(labels) or '(none above threshold)'}", flush=True)
    finally:
        from ray import serve

        serve.shutdown()

    _banner("6/6 report")
    baselines = baseline_table(catalog_uri, model_uri, DEMO_MODEL)
    report = write_report(
        out / "report.html",
        results,
        baselines=baselines,
        attributes=attributes,
        facts={
            "catalog items": ingest.get("num_ok"),
            "skipped images": ingest.get("num_skipped"),
            "training steps": steps,
            "model version": train.get("model_version"),
            "index version": index.get("version"),
            "served by": models,
            "wall time (s)": round(time.monotonic() - started, 1),
        },
    )
    hit_rate = sum(r.hits[0]["label"] == r.expected for r in results if r.hits) / max(len(results), 1)
    print(f"\ntop-1 label agreement over {len(results)} HTTP queries: {hit_rate:.2f}")
    for row in baselines:
        print(f"  {row['embedding']:<28} recall@1 {row['recall@1']:.3f}  map@r {row['map@r']:.3f}")
    return {
        "report": str(report),
        "top1_agreement": hit_rate,
        "queries": len(results),
        "baselines": baselines,
    }
