"""Batch embedding of a catalog: the build_index job's Ray Data path against a plain single-process torch loop.

Question: does the Ray Data batch inference of the build_index job (read Parquet -> decode -> model in
an actor pool, :func:`visuray.index.embed.embed_catalog_with_report`) embed a catalog at >= 0.9x the
images/s of a plain torch loop over the same Parquet, model and batch size, and are the vectors the same?

Protocol
--------
- Catalog: a published Parquet catalog (e.g. ``runs/catalogs/fashion-products``). ``--shards S`` embeds
  its first ``S`` Parquet shards (512 rows each), republished unchanged as a catalog of their own under
  ``--work`` so that both methods read exactly the same files; ``--shards 0`` uses the whole catalog.
- Model: a published embedding model (a finetune job output, ``visuray.checkpoint`` format).
- ``torch``: one process, ``torch.set_num_threads(--threads)``; timed from the start of reading to the
  sorted (N, D) array: read the shards with ``pyarrow.parquet.read_table`` (item_id, image), load the model
  (``load_embedding_model``), then per ``--batch-size`` rows ``decode_image`` -> ``to_model_input`` ->
  ``model(x)`` under ``torch.no_grad()`` -> L2-normalise (what a one-member ensemble emits), sort by id.
- ``ray``: an embedded local Ray cluster started once, before any timing (``embedded_cluster_options``,
  ``--ray-cpus`` logical CPUs); timed: one ``embed_catalog_with_report`` call, i.e. everything the
  build_index job does per run after ``ensure_ray``: resolving the model and catalog, planning the
  Dataset, starting the actor pool (worker processes, imports, model load), reading, repartitioning,
  embedding, collecting and sorting. Settings ``CxT`` = ``concurrency`` C actors of ``num_cpus_per_actor``
  T (T torch threads each): ``1x1`` is the job's default (``jobs/configs/build_index_lite0.yaml``).
- Order: one untimed warm-up of every method (file cache, imports, Ray worker pool; ``--skip-ray-warmup``
  warms up the torch loop only), then ``--rounds`` rounds of torch, ray settings..., alternating. Reported: images/s per run, the median per method, and
  the median of the per-round ratios ray / torch. The embeddings of every run are compared with the torch
  loop's (same ids, max |difference| <= 1e-4: they must agree up to float rounding).
- Also measured once (untimed part of the rounds): the fixed cost of one Ray actor: from creating a
  ``CatalogEmbedder`` actor to its first answer (process start, imports, model load).
- Run under ``flock /tmp/visuray-timing.lock``; the load average is printed.

Run:  flock /tmp/visuray-timing.lock .venv/bin/python benchmarks/batch_embedding.py \
          --catalog runs/catalogs/fashion-products --model runs/benchmarks/batch_embedding/model \
          --shards 8 --rounds 2 --ray-settings 1x1 1x2 2x1 --ray-cpus 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

SHARD_SUFFIX = ".parquet"


def subset_catalog(catalog_uri: str, shards: int, out: Path) -> str:
    """Publish the first ``shards`` Parquet shards of a catalog (bytes unchanged) as a catalog of their own."""
    import pyarrow.parquet as pq

    from visuray.storage import ArtifactWriter, absolute_uri, resolve_artifact

    source = resolve_artifact(absolute_uri(catalog_uri))
    names = sorted(n for n in source.manifest.files if n.endswith(SHARD_SUFFIX))[:shards]
    rows = 0
    with ArtifactWriter(str(out.resolve()), "catalog") as writer:
        for name in sorted(source.manifest.files):
            if name.endswith(SHARD_SUFFIX) and name not in names:
                continue
            data = source.read(name)
            writer.write_bytes(name, data)
            if name in names:
                rows += pq.read_metadata(writer.path_of(name)).num_rows
        metadata = {**source.manifest.metadata, "num_items": rows, "num_shards": len(names)}
        metadata["subset_of"] = {"uri": source.uri, "shards": names}
        artifact = writer.publish(metadata)
    return artifact.uri


def torch_loop(catalog_uri: str, model_uri: str, batch_size: int) -> tuple[list[str], np.ndarray]:
    """The plain baseline: pyarrow read, project decode/preprocessing, model under no_grad, in one process."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from visuray.images import decode_image, to_model_input
    from visuray.models.embedding import load_embedding_model
    from visuray.storage import resolve_artifact

    catalog = resolve_artifact(catalog_uri)
    names = sorted(n for n in catalog.manifest.files if n.endswith(SHARD_SUFFIX))
    table = pa.concat_tables(
        [pq.read_table(catalog.file_uri(name), columns=["item_id", "image"]) for name in names]
    )
    model, artifact = load_embedding_model(model_uri)
    img_size = int(artifact.manifest.metadata["img_size"])
    ids = table.column("item_id").to_pylist()
    images = table.column("image")
    chunks = []
    with torch.no_grad():
        for start in range(0, len(ids), batch_size):
            batch = [decode_image(b) for b in images.slice(start, batch_size).to_pylist()]
            out = model(to_model_input(batch, img_size)).float().numpy()
            chunks.append(out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12))
    vectors = np.concatenate(chunks).astype(np.float32)
    order = np.argsort(np.array(ids, dtype=object), kind="stable")
    return [ids[i] for i in order], vectors[order]


def ray_run(
    catalog_uri: str, model_uri: str, batch_size: int, concurrency: int, cpus: int
) -> tuple[list[str], np.ndarray]:
    from visuray.index.embed import embed_catalog_with_report

    result = embed_catalog_with_report(
        catalog_uri, model_uri, batch_size=batch_size, concurrency=concurrency, num_cpus_per_actor=cpus
    )
    return result.ids, result.vectors


def actor_start_seconds(model_uri: str, cpus: int) -> float:
    """Creating one CatalogEmbedder actor until it answers: the fixed cost each Ray run pays per actor."""
    import ray

    from visuray.index.embed import CatalogEmbedder, pin_encoder

    encoder, _, _ = pin_encoder(model_uri, None)
    started = time.perf_counter()
    actor = ray.remote(num_cpus=cpus)(CatalogEmbedder).remote(encoder, None, False, cpus)
    ray.get(actor.__ray_ready__.remote())
    seconds = time.perf_counter() - started
    ray.kill(actor)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--catalog", default="runs/catalogs/fashion-products")
    parser.add_argument("--model", required=True, help="published embedding model URI")
    parser.add_argument("--shards", type=int, default=8, help="first S shards of 512 rows; 0 = all")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the baseline")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--ray-settings", nargs="+", default=["1x1"], help="CxT: C actors of T CPUs")
    parser.add_argument("--ray-cpus", type=int, default=None, help="logical CPUs of the Ray cluster")
    parser.add_argument(
        "--skip-ray-warmup",
        action="store_true",
        help="no untimed Ray run first (every Ray run starts its own actors anyway); saves time on a loaded machine",
    )
    parser.add_argument("--work", type=Path, default=Path("runs/benchmarks/batch_embedding"))
    args = parser.parse_args()

    import ray
    import torch

    from visuray.cluster import embedded_cluster_options
    from visuray.storage import absolute_uri, resolve_artifact

    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.shards:
        catalog_uri = subset_catalog(args.catalog, args.shards, args.work / f"catalog-{args.shards}-shards")
    else:
        catalog_uri = resolve_artifact(absolute_uri(args.catalog)).uri
    model_uri = resolve_artifact(absolute_uri(args.model)).uri
    settings = [tuple(int(v) for v in s.split("x")) for s in args.ray_settings]

    # Cluster start-up is not part of any timing.
    ray.init(**embedded_cluster_options(args.ray_cpus, {"RAY_DATA_DISABLE_PROGRESS_BARS": "1"}))
    ray.data.DataContext.get_current().enable_progress_bars = False
    methods = ["torch"] + [f"ray {c}x{t}" for c, t in settings]

    def run(method: str) -> tuple[list[str], np.ndarray, float]:
        started = time.perf_counter()
        if method == "torch":
            ids, vectors = torch_loop(catalog_uri, model_uri, args.batch_size)
        else:
            concurrency, cpus = (int(v) for v in method.split()[1].split("x"))
            ids, vectors = ray_run(catalog_uri, model_uri, args.batch_size, concurrency, cpus)
        return ids, vectors, time.perf_counter() - started

    try:
        reference_ids, reference, _ = run("torch")  # warm-up: file cache, imports
        if not args.skip_ray_warmup:
            for method in methods[1:]:
                run(method)
        actor_s = {
            f"1 actor of {t} CPU": actor_start_seconds(model_uri, t) for t in sorted({t for _, t in settings})
        }
        num = len(reference_ids)
        print(f"catalog {catalog_uri}: {num} items; model {model_uri}; batch {args.batch_size}", flush=True)
        seconds: dict[str, list[float]] = {m: [] for m in methods}
        max_diff: dict[str, float] = {m: 0.0 for m in methods}
        loads = []
        for round_ in range(args.rounds):
            for method in methods:
                ids, vectors, took = run(method)
                if ids != reference_ids or vectors.shape != reference.shape:
                    raise AssertionError(f"{method}: embedded a different set of items than the torch loop")
                diff = float(np.abs(vectors - reference).max())
                if diff > 1e-4:
                    raise AssertionError(f"{method}: embeddings differ from the torch loop's by {diff}")
                max_diff[method] = max(max_diff[method], diff)
                seconds[method].append(took)
                print(f"round {round_} {method:>10}: {took:7.2f}s {num / took:8.1f} img/s", flush=True)
            loads.append(os.getloadavg())
    finally:
        ray.shutdown()

    torch_s = seconds["torch"]
    rows = []
    print(
        f"\n{'method':>10} {'img/s (median)':>15} {'ratio vs torch (median of rounds)':>34} {'max |diff|':>11}"
    )
    for method in methods:
        ratios = [t / s for t, s in zip(torch_s, seconds[method], strict=True)]
        row = {
            "method": method,
            "seconds": [round(s, 3) for s in seconds[method]],
            "images_per_s": round(num / statistics.median(seconds[method]), 1),
            "ratio_vs_torch": round(statistics.median(ratios), 3),
            "ratios": [round(r, 3) for r in ratios],
            "max_abs_diff": max_diff[method],
        }
        rows.append(row)
        print(
            f"{method:>10} {row['images_per_s']:>15.1f} {row['ratio_vs_torch']:>34.3f} {max_diff[method]:>11.2e}"
        )
    print(
        "fixed cost of one actor (start, imports, model load):", {k: round(v, 2) for k, v in actor_s.items()}
    )
    print("load average after each round:", loads)
    result: dict[str, Any] = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "items": num,
        "catalog": catalog_uri,
        "model": model_uri,
        "rows": rows,
        "actor_start_s": actor_s,
        "load_avg_rounds": loads,
    }
    path = args.work / f"results_shards{args.shards}_b{args.batch_size}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
