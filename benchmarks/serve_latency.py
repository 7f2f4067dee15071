"""Serve benchmarks: the Visuray Serve application against a plain FastAPI app on the same model and index.

Questions:

1. ``/v1/search`` p50 / p99 latency and throughput at concurrency 1, 8 and 32: the Serve application
   (router -> EmbeddingEnsemble -> Search, with ``@serve.batch``) against a plain single-process
   FastAPI + uvicorn app that loads the same model artifact with the platform's loader
   (:class:`visuray.index.ensemble.EmbeddingEnsemble`) and the same FAISS index
   (:class:`visuray.index.faiss_index.SearchIndex`), parses the upload with the router's own parser
   (:func:`visuray.serving.schemas.read_query`), decodes and downscales it the router's way, embeds, searches
   and returns ids and scores.
2. Batching: ``/v1/embed`` throughput at concurrency 32 with the embedder's ``@serve.batch`` at the
   configured ``max_batch_size`` against ``max_batch_size=1`` (same replicas, same everything else), over
   HTTP and through a direct ``DeploymentHandle`` call from the driver (no proxy, no router).
3. Router overhead: p50 of ``/healthz`` and ``/v1/models`` (no model runs) through Serve, beside the plain
   app's equivalent routes.

Protocol. ``prepare`` publishes a randomly initialised embedding model (speed does not depend on the
weights; the preset ``served`` is the architecture of ``jobs/configs/finetune_lite0.yaml``, which
``serve/config.yaml`` serves) and a flat inner-product index of every photo of an ingested catalog, and
writes 64 catalog photos as query files. ``compare`` starts an embedded Ray cluster with the Serve
application (fixed replica counts, no autoscaling, fusion and attributes left out: they are not on the
search path) and one or more baseline servers (each its own uvicorn process), then measures them one after
the other, alternating the order between rounds. The load always comes from a separate process
(``load``): ``concurrency`` asyncio clients, each on its own keep-alive HTTP/1.1 connection, each sending
its next request (multipart upload of the next query photo, ``k=10``) as soon as the previous answer
arrives (closed loop). Each measurement discards a warm-up, then counts the answers completed in a fixed
window: throughput = answers / window, latency percentiles over those answers. The machine's load average
is recorded beside every measurement. Run it under the timing lock; on a shared machine only the ratios
between rows measured in the same run mean anything.

Niceness: Ray starts its workers (the Serve replicas) at nice 15, so ``compare`` renices the baseline
servers to the same value and leaves the load generators at 0: servers compete on equal terms and none
starves its client. Serve runs with the platform's settings (``visuray.cluster.RAY_ENV_DEFAULTS``): Ray's
throughput-optimised mode, whose router replica also answers on its own port (direct ingress, no proxy
hop), measured as the ``serve-direct`` target beside ``serve`` (through the proxy).
``--serve-env RAY_SERVE_THROUGHPUT_OPTIMIZED=0`` measures Ray's default request path instead.

    python benchmarks/serve_latency.py prepare --catalog runs/catalogs/fashion-products \
        --work runs/benchmarks/serve/artifacts
    flock /tmp/visuray-timing.lock python benchmarks/serve_latency.py compare \
        --work runs/benchmarks/serve/artifacts --out runs/benchmarks/serve/compare.json

``load`` alone measures any running application (``--url``), e.g. one started with ``serve run``.
No ``from __future__ import annotations`` here: FastAPI reads the baseline routes' annotations as types.
"""

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# The architecture serve/config.yaml serves (jobs/configs/finetune_lite0.yaml), and the full ViT-tiny
# for a model whose forward pass, not the HTTP path, dominates a request.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "served": {
        "backbone": {"name": "vit_tiny_patch16_224", "img_size": 64, "patch_size": 8, "depth": 2},
        "embedding_dim": 128,
    },
    "vit-tiny-224": {
        "backbone": {"name": "vit_tiny_patch16_224", "img_size": 224, "patch_size": 16, "depth": 12},
        "embedding_dim": 128,
    },
}
APP_NAME = "visuray-bench"
K = 10
BOUNDARY = "visuraybenchboundary"


# ------------------------------------------------------------------------------------------- prepare
def prepare(
    catalog: str, work: Path, preset: str, num_queries: int, max_items: int | None, seed: int
) -> None:
    """Publish a random-init model, a flat index of the catalog embedded by it, and query photos."""
    import numpy as np
    import torch

    from visuray.catalog.schema import iter_rows
    from visuray.images import decode_image
    from visuray.index.ensemble import EmbeddingEnsemble, ensemble_spec
    from visuray.index.faiss_index import build_faiss_index, publish_index
    from visuray.models.config import EmbeddingModelConfig
    from visuray.models.embedding import build_embedding_model, save_model
    from visuray.storage import absolute_uri, resolve_artifact

    torch.manual_seed(seed)
    cfg = EmbeddingModelConfig.model_validate(MODEL_PRESETS[preset])
    model_uri = str((work / "model").absolute())
    save_model(model_uri, build_embedding_model(cfg).eval(), cfg, metadata={"note": "random init, benchmark"})
    ensemble = EmbeddingEnsemble.load(ensemble_spec(model_uri, None, "prepare"))

    catalog_artifact = resolve_artifact(absolute_uri(catalog))
    ids: list[str] = []
    vectors: list[np.ndarray] = []
    images: list[bytes] = []
    batch: list[Any] = []
    for row in iter_rows(catalog_artifact, columns=["item_id", "image"]):
        if max_items is not None and len(ids) >= max_items:
            break
        ids.append(row["item_id"])
        images.append(row["image"])
        batch.append(decode_image(row["image"]))
        if len(batch) == 256:
            vectors.append(ensemble.embed(batch))
            batch = []
    if batch:
        vectors.append(ensemble.embed(batch))
    index = publish_index(
        str((work / "index").absolute()),
        build_faiss_index(np.concatenate(vectors), "Flat", "ip"),
        ids,
        model_version=ensemble.version,
        metric="ip",
        factory="Flat",
        extra_metadata={
            "catalog_uri": catalog_artifact.uri,
            "catalog_version": catalog_artifact.manifest.version,
        },
    )
    queries = work / "queries"
    queries.mkdir(parents=True, exist_ok=True)
    for n, i in enumerate(sorted(random.Random(seed).sample(range(len(ids)), num_queries))):
        (queries / f"{n:03d}.jpg").write_bytes(images[i])
    info = {
        "preset": preset,
        "model": model_uri,
        "model_version": ensemble.version,
        "index": index.uri,
        "catalog": catalog_artifact.uri,
        "items": len(ids),
        "queries": num_queries,
    }
    (work / "prepared.json").write_text(json.dumps(info, indent=1))
    print(json.dumps(info, indent=1))


# ----------------------------------------------------------------------------------- baseline server
def baseline_app(model_uri: str, index_uri: str, threads: int, mode: str, device: str = "cpu") -> Any:
    """The plain FastAPI app: one process, the same loaders, parser, decoding, embedding and search.

    ``mode`` ``inline`` runs each request's work on the event loop (requests one at a time, no thread
    hops); ``threadpool`` runs it in a worker thread (requests overlap: torch and FAISS release the GIL).
    ``device`` is where the model runs (``cuda`` beside a Serve embedder given a GPU); FAISS stays on the CPU.
    """
    import faiss
    import numpy as np
    import torch
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from PIL import Image

    from visuray.images import DEFAULT_MAX_PIXELS, decode_image, resize_max_side
    from visuray.index.ensemble import EmbeddingEnsemble, ensemble_spec
    from visuray.index.faiss_index import SearchIndex
    from visuray.serving import ServeAppArgs, check_index_matches_model
    from visuray.serving.schemas import ClientError, parse_k, read_query

    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(1)  # one query at a time: FAISS threads would only add overhead
    defaults = ServeAppArgs(model=model_uri, index=index_uri)  # the same limits as the Serve app
    ensemble = EmbeddingEnsemble.load(ensemble_spec(model_uri, None, "baseline"), device=device)
    index = SearchIndex.load(index_uri)
    check_index_matches_model(
        {"model_version": index.model_version, "dim": index.dim},
        {"model_version": ensemble.version, "embedding_dim": ensemble.dim},
    )

    def vector(data: bytes) -> np.ndarray:
        image = decode_image(data, defaults.max_image_pixels or DEFAULT_MAX_PIXELS)
        pixels = np.asarray(resize_max_side(image, defaults.query_max_side))
        # Pixels -> PIL as the embedder deployment receives them from the router.
        return ensemble.embed([Image.fromarray(pixels)])[0]

    def search(data: bytes, k: int) -> dict[str, Any]:
        ids, scores = index.search(vector(data)[None, :], k)
        return {"ids": ids[0], "scores": [float(s) for s in scores[0]], "index_version": index.version}

    async def run(fn: Any, *args: Any) -> Any:
        return await asyncio.to_thread(fn, *args) if mode == "threadpool" else fn(*args)

    app = FastAPI()

    @app.exception_handler(ClientError)
    async def _client_error(request: Request, exc: ClientError) -> JSONResponse:
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "model": {"version": ensemble.version, "dim": ensemble.dim},
            "index": {"version": index.version},
        }

    @app.post("/v1/search")
    async def search_route(request: Request) -> dict[str, Any]:
        query = await read_query(request, defaults.max_image_bytes)
        k = parse_k(query.k, defaults.default_k, defaults.max_k)
        found = await run(search, query.image, k)
        return {"model_version": ensemble.version, "k": k, **found}

    @app.post("/v1/embed")
    async def embed_route(request: Request) -> dict[str, Any]:
        query = await read_query(request, defaults.max_image_bytes, ())
        embedding = (await run(vector, query.image)).tolist()
        return {"model_version": ensemble.version, "dim": len(embedding), "embedding": embedding}

    return app


def serve_baseline(
    model_uri: str, index_uri: str, port: int, threads: int, mode: str, device: str = "cpu"
) -> None:
    import uvicorn

    app = baseline_app(model_uri, index_uri, threads, mode, device)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


# ------------------------------------------------------------------------------------ load generator
def request_bytes(host: str, port: int, route: str, image: bytes | None) -> bytes:
    """One complete HTTP/1.1 request: a GET, or a multipart upload of ``image`` with ``k``."""
    if image is None:
        return f"GET {route} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
    k_part = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="k"\r\n\r\n{K}\r\n'.encode()
    head = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="q.jpg"\r\n'
        "Content-Type: image/jpeg\r\n\r\n"
    ).encode()
    body = (k_part if route == "/v1/search" else b"") + head + image + f"\r\n--{BOUNDARY}--\r\n".encode()
    return (
        f"POST {route} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


async def _read_response(reader: asyncio.StreamReader) -> int:
    """Read one response (Content-Length or chunked body); return its status code."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:] if h)}
    if "content-length" in headers:
        await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    return status


async def closed_loop(
    url: str, route: str, images: Sequence[bytes], concurrency: int, warmup_s: float, duration_s: float
) -> dict[str, Any]:
    """``concurrency`` clients, each sending its next request when the previous answer arrives.

    ``url`` may list several servers separated by commas (the router replicas' direct-ingress addresses):
    client ``n`` keeps its connection to the ``n``-th of them, round robin, as a load balancer would.
    """
    from urllib.parse import urlsplit

    bodies: Sequence[bytes | None] = images if route in ("/v1/search", "/v1/embed") else [None]
    servers = []
    for one in url.split(","):
        parts = urlsplit(one)
        host, port = parts.hostname or "127.0.0.1", parts.port or 80
        servers.append((host, port, [request_bytes(host, port, route, body) for body in bodies]))
    start = time.perf_counter()
    window = (start + warmup_s, start + warmup_s + duration_s)
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    failures: list[str] = []

    async def client(n: int) -> None:
        host, port, payloads = servers[n % len(servers)]
        reader, writer = await asyncio.open_connection(host, port)
        i = n
        try:
            while time.perf_counter() < window[1]:
                sent = time.perf_counter()
                writer.write(payloads[i % len(payloads)])
                i += concurrency
                try:
                    status = await _read_response(reader)
                except (asyncio.IncompleteReadError, ConnectionError) as exc:
                    failures.append(type(exc).__name__)
                    writer.close()
                    reader, writer = await asyncio.open_connection(host, port)
                    continue
                done = time.perf_counter()
                if window[0] <= sent and done <= window[1]:
                    latencies.append(done - sent)
                    statuses[status] = statuses.get(status, 0) + 1
        finally:
            writer.close()

    cpu = time.process_time()
    await asyncio.gather(*(client(n) for n in range(concurrency)))
    client_cpu = time.process_time() - cpu
    latencies.sort()

    def pct(q: float) -> float:
        return (
            latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000 if latencies else float("nan")
        )

    return {
        "route": route,
        "concurrency": concurrency,
        "window_s": duration_s,
        "answers": len(latencies),
        "non_2xx": sum(c for s, c in statuses.items() if not 200 <= s < 300),
        "statuses": {str(s): c for s, c in sorted(statuses.items())},
        "connection_failures": len(failures),
        "requests_per_s": len(latencies) / duration_s,
        "p50_ms": statistics.median(latencies) * 1000 if latencies else float("nan"),
        "p90_ms": pct(0.90),
        "p99_ms": pct(0.99),
        "mean_ms": statistics.fmean(latencies) * 1000 if latencies else float("nan"),
        "load_process_cpu_s": client_cpu,
    }


def query_images(folder: Path) -> list[bytes]:
    return [p.read_bytes() for p in sorted(folder.glob("*.jpg"))]


def run_load(
    url: str, route: str, queries: Path, concurrency: int, warmup_s: float, duration_s: float
) -> dict:
    try:
        import uvloop

        uvloop.install()  # a cheaper event loop leaves more of the 2 cores to the servers
    except ImportError:
        pass
    return asyncio.run(closed_loop(url, route, query_images(queries), concurrency, warmup_s, duration_s))


# ---------------------------------------------------------------------------------------- compare
def _load_in_subprocess(
    url: str, route: str, queries: Path, concurrency: int, warmup: float, window: float
) -> dict:
    """The load generator in its own process: its CPU is not the server's Python interpreter."""
    command = [
        sys.executable, __file__, "load", "--url", url, "--route", route, "--queries", str(queries),
        "--concurrency", str(concurrency), "--warmup", str(warmup), "--window", str(window), "--json",
    ]  # fmt: skip
    before = os.getloadavg()
    done = subprocess.run(command, capture_output=True, text=True, check=True, timeout=warmup + window + 120)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["loadavg_before"] = [round(x, 2) for x in before]
    result["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    return result


def _wait_http(url: str, timeout_s: float = 600) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer /healthz in {timeout_s}s")


def _ray_worker_niceness() -> int:
    """The niceness that this machine's raylet gave its workers (Serve replicas among them)."""
    import psutil

    for proc in psutil.process_iter(["cmdline", "nice"]):
        if any(part.startswith("ray::ServeReplica") for part in proc.info["cmdline"] or []):
            return int(proc.info["nice"])
    return 0


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def serve_args(prepared: dict[str, Any], opts: argparse.Namespace, embed_batch: int) -> Any:
    """serve/config.yaml's args with this run's model, index and fixed deployment sizes."""
    import yaml

    from visuray.config import validate_config
    from visuray.serving import ServeAppArgs

    config = yaml.safe_load((Path(__file__).parents[1] / "serve" / "config.yaml").read_text())
    args = dict(config["applications"][0]["args"])
    waits = {} if opts.batch_wait_s is None else {"batch_wait_timeout_s": opts.batch_wait_s}
    args.update(
        model=prepared["model"],
        index=prepared["index"],
        catalog=opts.catalog,  # None: the catalog the index was built from (its manifest's URI)
        fusion=None,  # not on the /v1/search path: left out so they hold no CPU or memory
        attributes=None,
        embed_batch={**args["embed_batch"], "max_batch_size": embed_batch, **waits},
        search_batch={**args["search_batch"], **waits},
        embedder={
            "num_replicas": opts.embed_replicas,
            "num_cpus": opts.embed_cpus,
            "num_gpus": opts.embed_gpus,
            "max_ongoing_requests": max(embed_batch, opts.embed_ongoing),
        },
        search={"num_replicas": opts.search_replicas, "num_cpus": 0.5, "max_ongoing_requests": 64},
        router={"num_replicas": opts.router_replicas, "num_cpus": 0.25, "max_ongoing_requests": 64},
    )
    return validate_config(ServeAppArgs, args)


def deploy(prepared: dict[str, Any], opts: argparse.Namespace, embed_batch: int, port: int) -> dict[str, str]:
    """(Re)deploy the application; its URLs: ``serve`` through the proxy, ``serve-direct`` straight to the
    router replicas (comma-separated, one per replica) when direct ingress is on (the platform default)."""
    from ray import serve

    from visuray.serving import direct_ingress_urls, start_serve_app

    if APP_NAME in serve.status().applications:
        serve.delete(APP_NAME)  # a clean redeploy: no answer can come from the previous replicas
    args = serve_args(prepared, opts, embed_batch)
    urls = {"serve": start_serve_app(args, port=port, name=APP_NAME, access_log=False)}
    direct = direct_ingress_urls(APP_NAME)
    if direct:
        urls["serve-direct"] = ",".join(direct)  # every router replica, the load spread over them
    return urls


async def _handle_closed_loop(
    handle: Any, pixels: Sequence[Any], concurrency: int, warmup_s: float, duration_s: float
) -> dict[str, Any]:
    """Closed loop straight to the embedder's replicas through a DeploymentHandle (no proxy, no router)."""
    start = time.perf_counter()
    window = (start + warmup_s, start + warmup_s + duration_s)
    latencies: list[float] = []

    async def client(n: int) -> None:
        i = n
        while time.perf_counter() < window[1]:
            sent = time.perf_counter()
            await handle.embed.remote(pixels[i % len(pixels)])
            i += concurrency
            done = time.perf_counter()
            if window[0] <= sent and done <= window[1]:
                latencies.append(done - sent)

    await asyncio.gather(*(client(n) for n in range(concurrency)))
    latencies.sort()
    return {
        "route": "handle:EmbeddingEnsemble.embed",
        "concurrency": concurrency,
        "answers": len(latencies),
        "requests_per_s": len(latencies) / duration_s,
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] * 1000,
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
    }


def compare(opts: argparse.Namespace) -> dict[str, Any]:
    # Set before Ray is imported or started: the raylet, the Serve controller, proxy and replicas inherit
    # it, and Serve reads its feature flags when a process first imports it (this driver's handles too).
    os.environ.update(dict(pair.split("=", 1) for pair in opts.serve_env))
    from visuray.cluster import apply_ray_env_defaults, embedded_cluster_options

    apply_ray_env_defaults()  # the platform's own settings where --serve-env leaves them unset
    import numpy as np
    import ray
    from ray import serve

    from visuray.images import decode_image, resize_max_side

    work = opts.work.absolute()
    prepared = json.loads((work / "prepared.json").read_text())
    queries = work / "queries"
    out: dict[str, Any] = {
        "prepared": prepared,
        "machine": {"cpus": os.cpu_count(), "loadavg_start": [round(x, 2) for x in os.getloadavg()]},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(opts).items()},
        "search": [],
        "overhead": [],
        "batching": [],
    }

    def save() -> None:
        opts.out.parent.mkdir(parents=True, exist_ok=True)
        opts.out.write_text(json.dumps(out, indent=1))

    baselines: dict[str, tuple[subprocess.Popen, str]] = {}
    for spec in opts.baselines:  # e.g. "inline:2", "threadpool:1", "threadpool:1:cuda"
        mode, threads, device = (spec.split(":") + ["cpu"])[:3]
        port = _free_port()
        command = [
            sys.executable, __file__, "baseline-server", "--model", prepared["model"], "--index",
            prepared["index"], "--port", str(port), "--threads", threads, "--mode", mode, "--device", device,
        ]  # fmt: skip
        name = f"plain-{mode}-t{threads}" + ("" if device == "cpu" else f"-{device}")
        baselines[name] = (subprocess.Popen(command), f"http://127.0.0.1:{port}")

    def give_up() -> None:  # a start that hangs (seen under a load average of 50+) ends the run: rerun it
        print(f"the cluster, Serve or a baseline did not start in {opts.start_timeout}s: exit 3", flush=True)
        import psutil

        # Under a load average of 50+ the raylet was seen aborting ("Timed out waiting for file ...
        # metrics_agent_port") and ray.init then waited for the GCS forever: end this run's processes.
        for child in psutil.Process().children(recursive=True):
            child.kill()
        os._exit(3)

    watchdog = threading.Timer(opts.start_timeout, give_up)
    watchdog.start()
    try:
        # Logical CPUs above the 2 cores so that every replica's declared share fits; the OS shares the cores.
        # No dashboard: Serve's Python API does not need it, and its dozen processes compete for the cores
        # (on the loaded machine its start timed out and left ray.init waiting for the GCS).
        for attempt in range(3):  # under a load average of 50+ the node's start sometimes timed out
            try:
                ray.init(**embedded_cluster_options(opts.ray_cpus, include_dashboard=False))
                break
            except Exception as exc:
                print(f"ray.init failed ({exc}); retrying", flush=True)
                ray.shutdown()
                import psutil

                keep = {proc.pid for proc, _ in baselines.values()}
                for child in psutil.Process().children(recursive=True):
                    if child.pid not in keep:  # the failed node's GCS and helpers
                        child.kill()
                if attempt == 2:
                    raise
        serve_urls = deploy(prepared, opts, opts.embed_batch, _free_port())
        for _, url in baselines.values():
            _wait_http(url)
        watchdog.cancel()
        import psutil

        if opts.nice_after_start is not None:
            # Started at normal priority (a niced start timed out), measured niced: for a machine shared
            # with a timing run that holds the lock. Replicas started later inherit it from the raylet.
            for proc in [psutil.Process(), *psutil.Process().children(recursive=True)]:
                proc.nice(opts.nice_after_start)
        else:
            # The raylet starts Ray workers, so every Serve replica, at nice 15 (Ray's worker_niceness),
            # and the baselines would start at 0: sharing the cores, they would take the CPU whenever they
            # want it, at the replicas' expense. Servers are measured at the same niceness, and the load
            # generators (children of this driver) stay at 0 so that no server starves its own client
            # (a closed loop is only as fast as its client).
            niceness = _ray_worker_niceness()
            for server in (psutil.Process(proc.pid) for proc, _ in baselines.values()):
                server.nice(max(niceness, server.nice()))
            out["niceness"] = {"servers": niceness, "load_generators": psutil.Process().nice()}
        targets = {**serve_urls, **{name: url for name, (_, url) in baselines.items()}}
        out["serve_sizes"] = {
            "router": {"replicas": opts.router_replicas, "num_cpus": 0.25},
            "embedder": {
                "replicas": opts.embed_replicas,
                "num_cpus": opts.embed_cpus,
                "num_gpus": opts.embed_gpus,
                "torch_threads": max(1, int(opts.embed_cpus)),
                "max_batch_size": opts.embed_batch,
            },
            "search": {
                "replicas": opts.search_replicas,
                "num_cpus": 0.5,
                "faiss_threads": 1,
                "max_batch_size": 32,
            },
            "ray_logical_cpus": opts.ray_cpus,
        }

        # 1 and 3: search at each concurrency, then the no-model routes; order alternates between rounds.
        for round_ in range(opts.rounds):
            order = list(targets) if round_ % 2 == 0 else list(reversed(targets))
            for name in order:
                for concurrency in opts.concurrency:
                    r = _load_in_subprocess(
                        targets[name], "/v1/search", queries, concurrency, opts.warmup, opts.window
                    )
                    out["search"].append({"target": name, "round": round_, **r})
                    print(_line(name, r), flush=True)
                    save()
                for route in ("/healthz", "/v1/models") if opts.overhead_window > 0 else ():
                    r = _load_in_subprocess(targets[name], route, queries, 1, 1.0, opts.overhead_window)
                    out["overhead"].append({"target": name, "round": round_, **r})
                    print(_line(name, r), flush=True)
                    save()

        # 2: batching, same replicas: configured max_batch_size against 1, alternating redeploys.
        if opts.batching_rounds:
            pixels = [np.asarray(resize_max_side(decode_image(b), 512)) for b in query_images(queries)]
            from ray.serve._private.constants import RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP

            # With the router on the caller's loop (part of the throughput-optimised mode) a driver's handle
            # routes on the loop it was first used from: a second asyncio.run() found that loop closed, and
            # one loop kept for every call hung after a redeploy. The handle path is measured without it.
            measure_handle = RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP
            # Over HTTP the way with the fewest hops: the router replica itself when direct ingress is on.
            via = "serve-direct" if "serve-direct" in serve_urls else "serve"
            url, deployed = serve_urls[via], opts.embed_batch
            for round_ in range(opts.batching_rounds):
                # configured, 1, 1, configured, ...: one redeploy per change, the order alternating
                sizes = [opts.embed_batch, 1] if round_ % 2 == 0 else [1, opts.embed_batch]
                for size in sizes:
                    if size != deployed:
                        url, deployed = deploy(prepared, opts, size, _free_port())[via], size
                    r = _load_in_subprocess(
                        url, "/v1/embed", queries, opts.batch_concurrency, opts.warmup, opts.window
                    )
                    out["batching"].append(
                        {"max_batch_size": size, "round": round_, "via": "http", "target": via, **r}
                    )
                    print(_line(f"serve batch={size}", r), flush=True)
                    if not measure_handle:
                        save()
                        continue
                    handle = serve.get_deployment_handle("EmbeddingEnsemble", app_name=APP_NAME)
                    h = asyncio.run(
                        _handle_closed_loop(handle, pixels, opts.batch_concurrency, opts.warmup, opts.window)
                    )
                    out["batching"].append({"max_batch_size": size, "round": round_, "via": "handle", **h})
                    print(_line(f"handle batch={size}", h), flush=True)
                    save()
    finally:
        for proc, _ in baselines.values():
            proc.terminate()
            proc.wait(timeout=30)
        if ray.is_initialized():  # serve.shutdown() without a cluster would start looking for one
            serve.shutdown()
            ray.shutdown()
    out["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    out["summary"] = summarise(out)
    save()
    print(json.dumps(out["summary"], indent=1))
    return out


def _line(name: str, r: dict[str, Any]) -> str:
    return (
        f"{name:<26} {r['route']:<32} c={r['concurrency']:<3} n={r['answers']:<6} "
        f"non2xx={r.get('non_2xx', 0):<4} p50={r['p50_ms']:8.2f}ms p99={r['p99_ms']:8.2f}ms "
        f"{r['requests_per_s']:8.1f} req/s  load={r.get('loadavg_after', ['?'])[0]}"
    )


def summarise(out: dict[str, Any]) -> dict[str, Any]:
    """Means over rounds per (target, route, concurrency); ratios of Serve to the best baseline."""

    def mean_rows(rows: list[dict[str, Any]], key: tuple[str, ...]) -> dict[tuple, dict[str, float]]:
        groups: dict[tuple, list[dict[str, Any]]] = {}
        for row in rows:
            groups.setdefault(tuple(row[k] for k in key), []).append(row)
        return {
            g: {m: statistics.fmean(r[m] for r in rs) for m in ("requests_per_s", "p50_ms", "p99_ms")}
            for g, rs in groups.items()
        }

    search = mean_rows(out["search"], ("target", "concurrency"))
    overhead = mean_rows(out["overhead"], ("target", "route"))
    batching = mean_rows(out["batching"], ("via", "max_batch_size"))
    summary: dict[str, Any] = {
        "search": {f"{t} c={c}": v for (t, c), v in search.items()},
        "overhead": {f"{t} {r}": v for (t, r), v in overhead.items()},
        "batching": {f"{via} max_batch_size={b}": v for (via, b), v in batching.items()},
    }
    concurrencies = sorted({c for _, c in search})
    served = sorted({t for t, _ in search if t.startswith("serve")})  # serve, and serve-direct if on
    baselines = sorted({t for t, _ in search if t not in served})
    if baselines and concurrencies:
        top = max(concurrencies)
        best = max(baselines, key=lambda t: search[(t, top)]["requests_per_s"])
        summary["best_baseline_at_top_concurrency"] = best
        for target in served:
            summary[f"{target}_vs_best_baseline"] = {
                f"c={c}": {
                    "throughput_ratio": search[(target, c)]["requests_per_s"]
                    / search[(best, c)]["requests_per_s"],
                    "p99_ratio": search[(target, c)]["p99_ms"] / search[(best, c)]["p99_ms"],
                }
                for c in concurrencies
            }
    vias = {via for via, _ in batching}
    sizes = sorted({b for _, b in batching})
    if len(sizes) == 2:
        summary["batching_throughput_ratio"] = {
            via: batching[(via, sizes[1])]["requests_per_s"] / batching[(via, sizes[0])]["requests_per_s"]
            for via in vias
        }
    return summary


# ------------------------------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="publish a model, an index of the catalog and query photos")
    p.add_argument("--catalog", required=True, help="an ingested catalog URI")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--preset", choices=sorted(MODEL_PRESETS), default="served")
    p.add_argument("--queries", type=int, default=64)
    p.add_argument("--max-items", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)

    c = sub.add_parser("compare", help="Serve app against plain FastAPI baselines, batching, overhead")
    c.add_argument("--work", type=Path, required=True, help="what `prepare` wrote")
    c.add_argument("--out", type=Path, required=True, help="results JSON")
    c.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    c.add_argument("--rounds", type=int, default=2, help="search rounds; the order alternates")
    c.add_argument("--warmup", type=float, default=4.0, help="seconds discarded before each window")
    c.add_argument("--window", type=float, default=15.0, help="seconds counted per measurement")
    c.add_argument(
        "--overhead-window", type=float, default=6.0, help="0 skips the router-overhead measurement"
    )
    c.add_argument(
        "--baselines",
        nargs="+",
        default=["inline:2", "threadpool:1"],
        help="plain apps, MODE:TORCH_THREADS[:DEVICE]",
    )
    c.add_argument("--ray-cpus", type=int, default=4, help="logical CPUs of the embedded cluster")
    c.add_argument(
        "--serve-env",
        nargs="+",
        default=[],
        metavar="NAME=VALUE",
        help="environment for every process of the cluster, e.g. RAY_SERVE_THROUGHPUT_OPTIMIZED=0 for Serve's "
        "default request path (the platform's settings otherwise)",
    )
    c.add_argument("--router-replicas", type=int, default=1)
    c.add_argument("--embed-replicas", type=int, default=1)
    c.add_argument(
        "--embed-gpus", type=float, default=0.0, help="num_gpus per embedder replica (cuda if > 0)"
    )
    c.add_argument("--search-replicas", type=int, default=1)
    c.add_argument(
        "--catalog",
        default=None,
        help="catalog for /v1/items; default: the one the index names, an absolute path on the machine "
        "that ran prepare (give a copy here when the artifacts moved to another machine)",
    )
    c.add_argument(
        "--embed-cpus", type=float, default=2.0, help="num_cpus per embedder replica = torch threads"
    )
    c.add_argument("--embed-batch", type=int, default=16, help="the configured embed_batch.max_batch_size")
    c.add_argument("--embed-ongoing", type=int, default=32, help="max_ongoing_requests per embedder replica")
    c.add_argument(
        "--batch-wait-s",
        type=float,
        default=None,
        help="batch_wait_timeout_s of the embedder and search batches (default: serve/config.yaml's)",
    )
    c.add_argument("--batching-rounds", type=int, default=2, help="0 skips the batching measurement")
    c.add_argument("--batch-concurrency", type=int, default=32)
    c.add_argument(
        "--nice-after-start",
        type=int,
        default=None,
        help="renice this run, Ray's own processes included, once it is up (default: the baselines take "
        "the niceness that Ray gives its workers, the load generators stay at 0)",
    )
    c.add_argument("--start-timeout", type=float, default=420, help="exit 3 if the apps are not up by then")

    b = sub.add_parser("baseline-server", help="run the plain FastAPI app (compare starts it)")
    b.add_argument("--model", required=True)
    b.add_argument("--index", required=True)
    b.add_argument("--port", type=int, required=True)
    b.add_argument("--threads", type=int, default=2)
    b.add_argument("--mode", choices=["inline", "threadpool"], default="inline")
    b.add_argument("--device", default="cpu", help="where the model runs: cpu or cuda")

    g = sub.add_parser("load", help="closed-loop load against a running app")
    g.add_argument("--url", default="http://127.0.0.1:8000", help="several separated by commas: round robin")
    g.add_argument("--route", default="/v1/search")
    g.add_argument("--queries", type=Path, required=True, help="folder of query .jpg files")
    g.add_argument("--concurrency", type=int, default=8)
    g.add_argument("--warmup", type=float, default=3.0)
    g.add_argument("--window", type=float, default=10.0)
    g.add_argument("--json", action="store_true", help="print one JSON line only")

    opts = parser.parse_args(argv)
    if getattr(opts, "window", 1.0) <= 0:
        parser.error("--window must be positive: answers are counted over it")
    if opts.command == "prepare":
        prepare(opts.catalog, opts.work, opts.preset, opts.queries, opts.max_items, opts.seed)
    elif opts.command == "compare":
        compare(opts)
    elif opts.command == "baseline-server":
        serve_baseline(opts.model, opts.index, opts.port, opts.threads, opts.mode, opts.device)
    else:
        r = run_load(opts.url, opts.route, opts.queries, opts.concurrency, opts.warmup, opts.window)
        print(json.dumps(r) if opts.json else _line(opts.url, r))


if __name__ == "__main__":
    main()
