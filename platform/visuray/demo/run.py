"""The main job, end to end on one machine: ingest -> DINO -> train -> index -> serve -> query -> report.

Everything is real and local: an embedded Ray cluster, local storage under ``--output``, the Serve
application on loopback, and HTTP requests with real image uploads. Every training stage runs a shipped job
spec from ``jobs/configs/`` with the demo's overrides (:mod:`visuray.demo.specs`), and every model starts
from the bundled ImageNet weights (EfficientNet-Lite0). Stages (each prints a ``i/N`` banner):

1. ingest the bundled sample (clothing-small, CC0) with its metadata CSV: class and a colour **estimated
   from the pixels** (:mod:`visuray.catalog.colours`), not annotated;
2. DINO continued from the pretrained weights on the catalog (no labels), on Ray Train;
3. metric fine-tuning (multi-similarity) from the same weights;
4. the attribute model beside its pooled baseline (:mod:`visuray.demo.attributes`);
5. composed retrieval: a MAAF fusion model (depth 1) trained on **templated** "same but in <colour>"
   queries (same class, asked colour);
6. the FAISS indexes: the embedding model's, and the fusion model's target space for composed search;
7. the Serve application (embedding, search, fusion, attributes behind one router), queried over HTTP:
   ``/v1/search``, ``/v1/attributes`` and ``/v1/search/composed`` for every bundled query photo;
8. the HTML report (:mod:`visuray.demo.report`): neighbours, attributes, composed answers, what serves
   them, and the leave-one-out table (raw pixels, random init, the weights as they are, DINO-continued,
   fine-tuned).

The default budget fits in under 10 minutes on 2 CPU cores; ``--steps`` sets the fine-tuning steps and
scales the DINO, attribute and fusion steps with it. On a GPU machine raise ``--steps``.

    visuray demo [--output demo-output] [--steps 100]
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

NEIGHBOURS = 5
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


@dataclass
class DemoRun:
    """Where one demo run writes, and how long each stage took."""

    out: Path
    started: float = field(default_factory=time.monotonic)
    stage_s: dict[str, float] = field(default_factory=dict)
    _since: float = field(default_factory=time.monotonic)

    def uri(self, name: str) -> str:
        return str(self.out / name)

    def paths(self, name: str, output: str) -> list[str]:
        """The overrides that point a training job at this run's catalog, output and run folder."""
        from visuray.demo.specs import run_overrides

        return run_overrides(name, self.uri("catalog"), self.uri(output), self.uri("train-runs"))

    def stage(self, text: str) -> None:
        log.info("=" * 20 + " %s " + "=" * 20, text)

    def done(self, name: str) -> None:
        now = time.monotonic()
        self.stage_s[name] = round(now - self._since, 1)
        log.info("stage %s took %.1f s", name, now - self._since)
        self._since = now


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


def train_stages(run: DemoRun, steps: int) -> dict[str, Any]:
    """Stages 1-6: the catalog, the four models and the two indexes; returns each job's summary."""
    from visuray.catalog.ingest import run_ingest
    from visuray.catalog.sample import SAMPLE_NAME, bundled_sample_dir, metadata_csv_path
    from visuray.demo import specs
    from visuray.demo.attributes import run_demo_attribute_stage
    from visuray.fusion.job import run_train_fusion
    from visuray.index.build import BuildIndexConfig, run_build_index
    from visuray.metric_learning.job import run_finetune
    from visuray.ssl.job import run_pretrain

    dino_steps = specs.scaled_steps(steps, specs.DINO_STEPS_PER_FINETUNE_STEP)
    fusion_steps = specs.scaled_steps(steps, specs.FUSION_STEPS_PER_FINETUNE_STEP)
    attribute_steps = specs.scaled_steps(steps, specs.ATTRIBUTE_STEPS_PER_FINETUNE_STEP)
    done: dict[str, Any] = {}

    run.stage("1/8 ingest the bundled sample (clothing-small, CC0; colours estimated from pixels)")
    sample = (str(bundled_sample_dir()), str(metadata_csv_path(SAMPLE_NAME)))
    done["ingest"] = run_ingest(specs.ingest_spec(*sample, run.uri("catalog")))
    log.info("catalog: %s items, %s skipped", done["ingest"].get("num_ok"), done["ingest"].get("num_skipped"))
    run.done("ingest")

    run.stage(f"2/8 DINO continued from the ImageNet weights on the catalog (no labels), {dino_steps} steps")
    done["dino"] = run_pretrain(specs.pretrain_spec(dino_steps, run.paths("demo-pretrain", "ssl-model")))
    log.info("DINO: %s steps, final loss %s", done["dino"].get("steps"), done["dino"].get("final_loss"))
    run.done("dino")

    run.stage("3/8 fine-tune the embedding model from the ImageNet weights (multi-similarity, P x K batches)")
    done["finetune_cfg"] = specs.finetune_spec(steps, run.paths("demo-finetune", "model"))
    done["train"] = run_finetune(done["finetune_cfg"])
    run.done("finetune")

    run.stage(
        f"4/8 train the attribute model (channel attention) and its pooled baseline, {attribute_steps} steps"
    )
    attribute_job = specs.attribute_spec(attribute_steps, run.uri("catalog"), run.uri("attributes"))
    done["attributes"] = attributes = run_demo_attribute_stage(attribute_job)
    log.info(
        "attributes: macro AUC %.3f (pooled baseline %.3f) on held-out photos",
        attributes["mean_auc"],
        attributes["baseline_mean_auc"],
    )
    run.done("attributes")

    run.stage(f"5/8 train the composed-retrieval model (MAAF depth 1, templated texts), {fusion_steps} steps")
    fusion = done["fusion"] = run_train_fusion(
        specs.fusion_spec(fusion_steps, run.paths("demo-fusion", "fusion-model"))
    )
    # The held-out headline figures (test/recall@k, test/num_queries); per-class breakdowns stay in the
    # fusion model's own report.html.
    done["fusion_metrics"] = {
        k: v for k, v in fusion.get("metrics", {}).items() if k.startswith("test/") and k.count("/") == 1
    }
    log.info("fusion: %s steps, held-out %s", fusion.get("steps"), done["fusion_metrics"])
    run.done("fusion")

    run.stage("6/8 build the FAISS indexes (Ray Data batch embedding): embedding model, fusion targets")
    catalog = run.uri("catalog")
    done["index"] = run_build_index(
        BuildIndexConfig(catalog=catalog, model=run.uri("model"), output=run.uri("index"))
    )
    done["fusion_index"] = run_build_index(
        BuildIndexConfig(
            name="build_index_fusion",
            catalog=catalog,
            fusion=run.uri("fusion-model"),
            output=run.uri("fusion-index"),
        )
    )
    run.done("indexes")
    return done


def query_over_http(
    run: DemoRun, port: int, attribute_model: str, catalog_rows: dict[str, dict[str, str]]
) -> Any:
    """Stage 7: start the Serve application, send every bundled query photo to /v1/search, /v1/attributes and
    /v1/search/composed, print the answers; returns (query results, composed results, /v1/models)."""
    import httpx

    from visuray.catalog.sample import QUERY_NAME, bundled_query_dir, read_sample_metadata
    from visuray.demo.report import ComposedResult, QueryResult
    from visuray.serving import AttributesArgs, FusionArgs, ServeAppArgs, start_serve_app

    run.stage("7/8 start the Serve application and query it over HTTP (search, attributes, composed)")
    url = start_serve_app(
        ServeAppArgs(
            model=run.uri("model"),
            index=run.uri("index"),
            catalog=run.uri("catalog"),
            attributes=AttributesArgs(model=attribute_model),
            fusion=FusionArgs(model=run.uri("fusion-model"), index=run.uri("fusion-index")),
        ),
        host="127.0.0.1",
        port=port or free_local_port(),
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
    run.done("serve+queries")
    return results, composed, models


def run_demo(opts: DemoOptions) -> dict[str, Any]:
    from visuray.catalog.sample import SAMPLE_NAME, read_sample_metadata
    from visuray.cluster import ensure_ray
    from visuray.demo.report import baseline_table, dino_adaptation_note, write_report
    from visuray.demo.specs import DEMO_STEPS
    from visuray.models.weights import check_pretrained, import_weights

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request would drown the output
    run = DemoRun(Path(opts.output).absolute())
    run.out.mkdir(parents=True, exist_ok=True)
    steps = opts.steps or DEMO_STEPS
    # Logical CPUs above the 2 physical cores so trainer, data pool and replicas can coexist.
    ensure_ray(num_cpus=opts.num_cpus or 4)
    done = train_stages(run, steps)
    catalog_rows = read_sample_metadata(SAMPLE_NAME)
    attributes, fusion_metrics = done["attributes"], done["fusion_metrics"]
    results, composed, models = query_over_http(run, opts.port, attributes["model"], catalog_rows)

    run.stage("8/8 report: the retrieval table beside raw pixels, random init and the weights as they are")
    pretrained_uri = run.uri("pretrained-model")
    import_weights(pretrained_uri, check_pretrained(done["finetune_cfg"].model.backbone))
    # What random neighbours would score: the share of the catalog in the query's class and asked colour.
    composed_chance = sum(
        sum(r["class"] == c.expected and r["colour"] == c.wanted_colour for r in catalog_rows.values())
        for c in composed
    ) / max(len(composed) * len(catalog_rows), 1)
    baselines = baseline_table(
        run.uri("catalog"),
        run.uri("model"),
        ssl_model_uri=run.uri("ssl-model"),
        pretrained_model_uri=pretrained_uri,
    )
    run.done("report")
    dino, train, fusion = done["dino"], done["train"], done["fusion"]
    dino_note = dino_adaptation_note(baselines, dino.get("steps", 0))
    report = write_report(
        run.out / "report.html",
        results,
        baselines=baselines,
        attributes=attributes,
        composed=composed,
        composed_note=COLOUR_NOTE,
        composed_metrics=fusion_metrics,
        composed_chance=composed_chance,
        served_by=models,
        retrieval_note=" ".join(filter(None, [RETRIEVAL_NOTE, dino_note])),
        facts={
            "catalog items": done["ingest"].get("num_ok"),
            "skipped images": done["ingest"].get("num_skipped"),
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
            "index version": done["index"].get("version"),
            "fusion index version": done["fusion_index"].get("version"),
            "stage wall times (s)": run.stage_s,
            "wall time (s)": round(time.monotonic() - run.started, 1),
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
    if dino_note:
        print(dino_note)
    print(f"wall time {time.monotonic() - run.started:.0f} s; stages (s): {run.stage_s}", flush=True)
    return {
        "report": str(report),
        "top1_agreement": hit_rate,
        "queries": len(results),
        "composed_queries": len(composed),
        "composed_precision": composed_precision,
        "composed_chance": composed_chance,
        "baselines": baselines,
        "dino": {k: dino.get(k) for k in ("steps", "final_loss", "model_version")},
        "dino_note": dino_note,
        "fusion_metrics": fusion_metrics,
        "stage_s": run.stage_s,
    }
