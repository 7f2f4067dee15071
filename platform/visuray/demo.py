"""The main job, end to end on one machine: ingest → DINO → train → index → serve → query → report.

Everything is real and local: an embedded Ray cluster, local storage under ``--output``, the Serve
application on loopback, and HTTP requests with real image uploads. Stages (each prints a ``i/N`` banner):

1. ingest the bundled sample (clothing-small, CC0) with its metadata CSV: class and a colour **estimated
   from the pixels** (:mod:`visuray.catalog.colours`), not annotated;
2. DINO self-supervised pretraining (no labels) on Ray Train, continued from the bundled ImageNet
   weights (EfficientNet-Lite0), a CPU-sized budget;
3. metric fine-tuning (multi-similarity) from the same pretrained weights;
4. the attribute model beside its pooled baseline;
5. composed retrieval: a MAAF fusion model (depth 1) trained on **templated** "same but in <colour>"
   queries (same class, asked colour);
6. the FAISS indexes: the embedding model's, and the fusion model's target space for composed search;
7. the Serve application (embedding, search, fusion, attributes behind one router), queried over HTTP:
   ``/v1/search``, ``/v1/attributes`` and ``/v1/search/composed`` for every bundled query photo;
8. the HTML report: neighbours, attributes, composed answers, and the leave-one-out table (raw pixels,
   random init, the pretrained weights with no training, DINO-continued, fine-tuned).

Every model starts from the bundled EfficientNet-Lite0 ImageNet weights (160 px; 128 px for the attribute
and composed models, whose early stages stay frozen); the default budget fits in under 10 minutes on 2 CPU
cores. ``--steps`` sets the fine-tuning steps and scales the DINO, attribute and fusion steps with it. On
a GPU machine raise ``--steps``.

    visuray demo [--output demo-output] [--steps 400]
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Every network starts from the bundled ImageNet weights (EfficientNet-Lite0, model.backbone.weights's
# default) at 160 px: on the sample's street photos its pooled features alone give ~0.65 of leave-one-out
# Recall@1 at 160 px against ~0.55 at 96 px (benchmarks/README.md), and a training step of 32 photos with the
# stem and first three stages frozen takes ~0.7 s on 2 cores.
DEMO_MODEL = {"backbone": {"img_size": 160}, "embedding_dim": 128}
# Multi-similarity (the job's default objective) at lr 3e-4 for 100 steps: on held-out clothing-small
# photos the query top-1 went from 0.63 (pretrained, random projection) to 0.69; at lr 1e-4 it fell (the
# fresh projection learns too slowly and the backbone drifts meanwhile).
DEMO_STEPS = 100
DEMO_TRAIN = {"lr": 3e-4, "warmup_steps": 10, "freeze_blocks": 3}
# Two CPUs for the one training worker: Ray gives a worker as many torch threads as CPUs (one would halve
# the step rate), and the demo's cluster has 4 logical CPUs on the 2 cores.
DEMO_SCALING = {"num_workers": 1, "use_gpu": False, "cpus_per_worker": 2, "max_failures": 1}
DEMO_LOSS = {"name": "multi_similarity"}
NEIGHBOURS = 5
# The attribute stage trains two small models in-process (attention and pooled baseline) on the pretrained
# backbone with all but its last two stages frozen; 0.6 of the fine-tuning steps (60 at the default 100).
ATTRIBUTE_STEPS_PER_FINETUNE_STEP = 0.6

# DINO continued from the same pretrained weights (domain adaptation on the catalog's photos, no labels):
# two 128 px global crops and two 64 px local crops, one worker with one CPU (with two CPUs per worker the
# Ray Data read tasks that feed it starve on a 2-core machine). 0.2 of the fine-tuning steps (20 at the
# default): a demonstration of the job, not enough steps to move the pretrained features much.
DINO_STEPS_PER_FINETUNE_STEP = 0.2
DEMO_DINO_BACKBONE = {"img_size": 128}  # 160 px global crops took ~3 s a step on 2 cores
DEMO_DINO = {
    "model": {"out_dim": 1024, "hidden_dim": 256, "bottleneck_dim": 64},
    "crops": {"num_local": 2, "local_size": 64},
    "train": {
        "batch_size_per_worker": 16,
        "lr": 5.0e-4,  # DINO's rate, scaled by batch/256: a gentle 3e-5 for pretrained weights
        "log_every": 5,
        "shuffle_buffer": 64,
        "tensorboard": False,
    },
    "export": {"batchnorm_images": 300},
    "deepspeed": {"zero_stage": 2, "precision": "auto"},
    "scaling": {"num_workers": 1, "use_gpu": False, "cpus_per_worker": 1, "max_failures": 1},
}
# Composed retrieval: MAAF depth 1 over the pretrained image encoder's tokens (4 x 4 at 128 px; all but its
# last two stages frozen) and a one-block text encoder, on "same kind, in <colour>" queries templated from
# the class and the estimated colour. 0.6 of the fine-tuning steps (60 at the default) at batch 32.
FUSION_STEPS_PER_FINETUNE_STEP = 0.6
DEMO_FUSION = {
    "tokenizer": {"vocab_size": 500, "min_frequency": 1},
    "data": {
        "kinds": ["type_colour"],
        "type_key": "class",
        "colour_key": "colour",
        "max_items": None,
        "test_fraction": 0.2,
        "type_colour_per_item": 2,
        "seed": 0,
    },
    "model": {
        "backbone": {"img_size": 128},
        "text": {"width": 64, "depth": 1, "heads": 2, "max_length": 16, "dropout": 0.1},
        "fusion": "maaf",
        "fusion_depth": 1,
        "fusion_width": 64,
        "fusion_heads": 2,
        "embed_dim": 64,
    },
    "train": {"batch_size": 32, "lr": 1e-3, "log_every": 20, "keep_checkpoints": 1, "freeze_blocks": 5},
    "eval": {"ks": [1, 5, 10], "report_queries": 4, "report_top_k": 5, "batch_size": 64},
    "scaling": DEMO_SCALING,
}
RETRIEVAL_NOTE = (
    "The catalog is also what the fine-tuned model trained on, so its row here measures fit, not "
    "generalisation; the HTTP queries below are held-out photos, and benchmarks/README.md has class-disjoint "
    "and street-to-shop figures."
)
COMPOSED_TEMPLATE = "same but in {colour}"
COLOUR_NOTE = (
    "Colours are ESTIMATED FROM THE PIXELS (dominant colour of the non-background pixels, named from a small "
    "palette), not annotated; the composed-query texts are TEMPLATED ('same but in <colour>'), not written "
    "by people."
)


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


def free_local_port() -> int:
    """A port nothing listens on now. Picked just before Serve binds it: a port chosen minutes earlier (a
    caller's, before the training stages) can be taken meanwhile by any of the processes those stages start."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def scaled_steps(finetune_steps: int, fraction: float, minimum: int = 4) -> int:
    """Steps of a secondary stage tied to ``--steps`` (the fine-tuning steps), at least ``minimum``."""
    return max(minimum, round(finetune_steps * fraction))


def pick_target_colours(
    queries: list[tuple[str, str]], catalog_rows: dict[str, dict[str, str]]
) -> list[str | None]:
    """For each (class, own colour) query, a colour to ask for: another colour that class has in the
    catalog, so that the composed query has answers. Colours are ranked by how many catalog items of the
    class have them (ties by name); the n-th query of a class takes the n-th ranked colour, so two queries
    of one class ask for different colours. None where the class has no other colour."""
    by_class: dict[str, Counter[str]] = {}
    for row in catalog_rows.values():
        by_class.setdefault(row["class"], Counter())[row["colour"]] += 1
    seen: Counter[str] = Counter()
    picked: list[str | None] = []
    for cls, own in queries:
        ranked = sorted(by_class.get(cls, Counter()).items(), key=lambda kv: (-kv[1], kv[0]))
        others = [colour for colour, _ in ranked if colour != own]
        picked.append(others[seen[cls] % len(others)] if others else None)
        seen[cls] += 1
    return picked


def run_demo(opts: DemoOptions) -> dict[str, Any]:
    import httpx

    from visuray.attributes.demo_stage import run_demo_attribute_stage
    from visuray.catalog.ingest import IngestConfig, run_ingest
    from visuray.catalog.sample import (
        QUERY_NAME,
        SAMPLE_NAME,
        bundled_query_dir,
        bundled_sample_dir,
        metadata_csv_path,
        read_sample_metadata,
    )
    from visuray.cluster import ensure_ray
    from visuray.fusion.config import FusionTrainConfig
    from visuray.fusion.job import run_train_fusion
    from visuray.index.build import BuildIndexConfig, run_build_index
    from visuray.metric_learning.config import FinetuneConfig
    from visuray.metric_learning.job import run_finetune
    from visuray.models.weights import check_pretrained, import_weights
    from visuray.report import ComposedResult, QueryResult, baseline_table, write_report
    from visuray.serving import AttributesArgs, FusionArgs, ServeAppArgs, start_serve_app
    from visuray.ssl.config import PretrainConfig
    from visuray.ssl.job import run_pretrain

    started = time.monotonic()
    stage_s: dict[str, float] = {}
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request would drown the output
    out = Path(opts.output).absolute()
    out.mkdir(parents=True, exist_ok=True)
    catalog_uri, model_uri, index_uri = str(out / "catalog"), str(out / "model"), str(out / "index")
    ssl_uri, fusion_uri, fusion_index_uri, pretrained_uri = (
        str(out / "ssl-model"),
        str(out / "fusion-model"),
        str(out / "fusion-index"),
        str(out / "pretrained-model"),
    )
    steps = opts.steps or DEMO_STEPS
    dino_steps = scaled_steps(steps, DINO_STEPS_PER_FINETUNE_STEP)
    fusion_steps = scaled_steps(steps, FUSION_STEPS_PER_FINETUNE_STEP)
    attribute_steps = scaled_steps(steps, ATTRIBUTE_STEPS_PER_FINETUNE_STEP)
    # Logical CPUs above the 2 physical cores so trainer, data pool and replicas can coexist.
    ensure_ray(num_cpus=opts.num_cpus or 4)

    def stage_done(name: str, since: float) -> float:
        now = time.monotonic()
        stage_s[name] = round(now - since, 1)
        log.info("stage %s took %.1f s", name, now - since)
        return now

    t = time.monotonic()
    _banner("1/8 ingest the bundled sample (clothing-small, CC0; colours estimated from pixels)")
    ingest = run_ingest(
        IngestConfig(
            source=str(bundled_sample_dir()),
            metadata_csv=str(metadata_csv_path(SAMPLE_NAME)),
            id_column="id",
            image_column="image",
            label_column="class",
            category_column="class",
            # The sample has no product titles. The id (class/file stem) stands in for one, so that every
            # photo is its own product line, as it is (and the report has something to show as a title).
            title_column="id",
            output=catalog_uri,
        )
    )
    log.info("catalog: %s items, %s skipped", ingest.get("num_ok"), ingest.get("num_skipped"))
    catalog_rows = read_sample_metadata(SAMPLE_NAME)
    t = stage_done("ingest", t)

    _banner(f"2/8 DINO continued from the ImageNet weights on the catalog (no labels), {dino_steps} steps")
    dino_cfg = PretrainConfig.model_validate(
        {
            **DEMO_DINO,
            "name": "demo-pretrain",
            "catalog": catalog_uri,
            "output": ssl_uri,
            "run_dir": str(out / "train-runs"),
            "model": {**DEMO_DINO["model"], "backbone": DEMO_DINO_BACKBONE},
            "train": {
                **DEMO_DINO["train"],
                "steps": dino_steps,
                "warmup_steps": max(dino_steps // 10, 1),
                "warmup_teacher_temp_steps": max(dino_steps // 2, 1),
                # The head starts random: its last layer stays fixed while the rest finds its footing.
                "freeze_last_layer_steps": max(dino_steps // 4, 1),
                "checkpoint_every": dino_steps,
            },
        }
    )
    dino = run_pretrain(dino_cfg)
    log.info("DINO: %s steps, final loss %s", dino.get("steps"), dino.get("final_loss"))
    t = stage_done("dino", t)

    _banner("3/8 fine-tune the embedding model from the ImageNet weights (multi-similarity, P x K batches)")
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
                "log_every": 10,
                "data_workers": 0,
            },
            "loss": DEMO_LOSS,
            "scaling": DEMO_SCALING,
        }
    )
    train = run_finetune(train_cfg)
    t = stage_done("finetune", t)

    _banner(
        f"4/8 train the attribute model (channel attention) and its pooled baseline, {attribute_steps} steps"
    )
    attributes = run_demo_attribute_stage(catalog_uri, str(out / "attributes"), attribute_steps)
    log.info(
        "attributes: macro AUC %.3f (pooled baseline %.3f) on held-out photos",
        attributes["mean_auc"],
        attributes["baseline_mean_auc"],
    )
    t = stage_done("attributes", t)

    _banner(f"5/8 train the composed-retrieval model (MAAF depth 1, templated texts), {fusion_steps} steps")
    fusion_cfg = FusionTrainConfig.model_validate(
        {
            **DEMO_FUSION,
            "name": "demo-fusion",
            "catalog": catalog_uri,
            "output": fusion_uri,
            "run_dir": str(out / "train-runs"),
            "train": {
                **DEMO_FUSION["train"],
                "steps": fusion_steps,
                "warmup_steps": max(fusion_steps // 10, 1),
                "checkpoint_every": fusion_steps,
            },
        }
    )
    fusion = run_train_fusion(fusion_cfg)
    # The held-out headline figures (test/recall@k, test/num_queries); per-class breakdowns stay in the
    # fusion model's own report.html.
    fusion_metrics = {
        k: v for k, v in fusion.get("metrics", {}).items() if k.startswith("test/") and k.count("/") == 1
    }
    log.info("fusion: %s steps, held-out %s", fusion.get("steps"), fusion_metrics)
    t = stage_done("fusion", t)

    _banner("6/8 build the FAISS indexes (Ray Data batch embedding): embedding model, fusion targets")
    index = run_build_index(BuildIndexConfig(catalog=catalog_uri, model=model_uri, output=index_uri))
    fusion_index = run_build_index(
        BuildIndexConfig(
            name="build_index_fusion", catalog=catalog_uri, fusion=fusion_uri, output=fusion_index_uri
        )
    )
    t = stage_done("indexes", t)

    _banner("7/8 start the Serve application and query it over HTTP (search, attributes, composed)")
    url = start_serve_app(
        ServeAppArgs(
            model=model_uri,
            index=index_uri,
            catalog=catalog_uri,
            attributes=AttributesArgs(model=attributes["model"]),
            fusion=FusionArgs(model=fusion_uri, index=fusion_index_uri),
        ),
        host="127.0.0.1",
        port=opts.port or free_local_port(),
        access_log=False,
    )
    queries = _query_images(bundled_query_dir())
    query_rows = read_sample_metadata(QUERY_NAME)
    query_colours = [query_rows[f"{cls}/{path.stem}"]["colour"] for cls, path in queries]
    targets = pick_target_colours([(cls, c) for (cls, _), c in zip(queries, query_colours, strict=True)],
                                  catalog_rows)  # fmt: skip
    results: list[QueryResult] = []
    composed: list[ComposedResult] = []
    try:
        with httpx.Client(base_url=url, timeout=60) as client:
            models = client.get("/v1/models").raise_for_status().json()

            def neighbour_images(hits: list[dict[str, Any]]) -> list[bytes]:
                return [
                    client.get(f"/v1/items/{h['item_id']}/image").raise_for_status().content for h in hits
                ]

            for expected, path in queries:
                upload = {"image": (path.name, path.read_bytes(), "image/jpeg")}
                resp = client.post("/v1/search", files=upload, data={"k": str(NEIGHBOURS)})
                hits = resp.raise_for_status().json()["results"]
                predicted = client.post("/v1/attributes", files=upload).raise_for_status().json()["labels"]
                labels = [f"{a['label']} {a['score']:.2f}" for a in predicted]
                results.append(
                    QueryResult(path.name, expected, path.read_bytes(), hits, neighbour_images(hits), labels)
                )
                shown = ", ".join(f"{h['label']}({h['score']:.2f})" for h in hits)
                print(f"query {expected:>10} {path.name[:12]:<12} -> {shown}", flush=True)
                print(f"      attributes: {', '.join(labels) or '(none above threshold)'}", flush=True)

            print(f"\ncomposed search over HTTP (/v1/search/composed). {COLOUR_NOTE}", flush=True)
            for (expected, path), own, wanted in zip(queries, query_colours, targets, strict=True):
                if wanted is None:
                    continue
                text = COMPOSED_TEMPLATE.format(colour=wanted)
                resp = client.post(
                    "/v1/search/composed",
                    files={"image": (path.name, path.read_bytes(), "image/jpeg")},
                    data={"k": str(NEIGHBOURS), "text": text},
                )
                hits = resp.raise_for_status().json()["results"]
                colours = [catalog_rows.get(h["item_id"], {}).get("colour", "?") for h in hits]
                composed.append(
                    ComposedResult(
                        path.name, expected, own, text, wanted, path.read_bytes(), hits,
                        neighbour_images(hits), colours,
                    )
                )  # fmt: skip
                shown = ", ".join(
                    f"{h['label']}/{c}({h['score']:.2f})" for h, c in zip(hits, colours, strict=True)
                )
                print(f"composed {expected:>10} {own:>6} + {text!r:<22} -> {shown}", flush=True)
    finally:
        from ray import serve

        serve.shutdown()
    t = stage_done("serve+queries", t)

    _banner("8/8 report: the retrieval table beside raw pixels, random init and the weights as they are")
    import_weights(pretrained_uri, check_pretrained(train_cfg.model.backbone))
    # What random neighbours would score: the share of the catalog in the query's class and asked colour.
    composed_chance = sum(
        sum(r["class"] == c.expected and r["colour"] == c.wanted_colour for r in catalog_rows.values())
        for c in composed
    ) / max(len(composed) * len(catalog_rows), 1)
    baselines = baseline_table(
        catalog_uri, model_uri, ssl_model_uri=ssl_uri, pretrained_model_uri=pretrained_uri
    )
    stage_done("report", t)
    report = write_report(
        out / "report.html",
        results,
        baselines=baselines,
        attributes=attributes,
        composed=composed,
        composed_note=COLOUR_NOTE,
        composed_metrics=fusion_metrics,
        composed_chance=composed_chance,
        served_by=models,
        retrieval_note=RETRIEVAL_NOTE,
        facts={
            "catalog items": ingest.get("num_ok"),
            "skipped images": ingest.get("num_skipped"),
            "catalog colours (estimated from pixels)": dict(
                sorted(Counter(r["colour"] for r in catalog_rows.values()).items())
            ),
            "starting weights": "efficientnet_lite0 (ImageNet-1k, bundled; see README: licence)",
            "DINO pretraining steps (no labels)": dino.get("steps"),
            "DINO final loss": dino.get("final_loss"),
            "DINO model version": dino.get("model_version"),
            "training steps": steps,
            "model version": train.get("model_version"),
            "attribute training steps (each head)": attributes["steps"],
            "fusion training steps (MAAF depth 1)": fusion.get("steps"),
            "fusion model version": fusion.get("model_version"),
            "index version": index.get("version"),
            "fusion index version": fusion_index.get("version"),
            "stage wall times (s)": stage_s,
            "wall time (s)": round(time.monotonic() - started, 1),
        },
    )
    hit_rate = sum(r.hits[0]["label"] == r.expected for r in results if r.hits) / max(len(results), 1)
    composed_hits = [
        h["label"] == c.expected and colour == c.wanted_colour
        for c in composed
        for h, colour in zip(c.hits, c.hit_colours, strict=True)
    ]
    composed_precision = sum(composed_hits) / max(len(composed_hits), 1)
    print(f"\ntop-1 label agreement over {len(results)} HTTP queries: {hit_rate:.2f}")
    print(
        f"composed: {len(composed)} HTTP queries, neighbours of the query's class in the asked colour: "
        f"{sum(composed_hits)}/{len(composed_hits)} ({composed_precision:.2f}; "
        f"chance {composed_chance:.2f}); "
        f"held-out {', '.join(f'{k} {v:.3f}' for k, v in fusion_metrics.items() if 'recall' in k)}"
    )
    for row in baselines:
        print(f"  {row['embedding']:<28} recall@1 {row['recall@1']:.3f}  map@r {row['map@r']:.3f}")
    print(f"wall time {time.monotonic() - started:.0f} s; stages (s): {stage_s}", flush=True)
    return {
        "report": str(report),
        "top1_agreement": hit_rate,
        "queries": len(results),
        "composed_queries": len(composed),
        "composed_precision": composed_precision,
        "composed_chance": composed_chance,
        "baselines": baselines,
        "dino": {k: dino.get(k) for k in ("steps", "final_loss", "model_version")},
        "fusion_metrics": fusion_metrics,
        "stage_s": stage_s,
    }
