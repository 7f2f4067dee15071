"""Latency of a running Visuray Serve application: /v1/search p50/p95 and throughput per concurrency.

    python benchmarks/serve_latency.py --url http://127.0.0.1:8000 --image query.jpg \
        --concurrency 1 4 16 --requests 200

Start the application first (`visuray serve ...` or `serve run serve/config.yaml`). Each concurrency
level runs after a short warm-up; numbers are only comparable on the same machine and deployment sizes.
"""

from __future__ import annotations

import argparse
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def run_level(url: str, image: bytes, concurrency: int, requests: int, k: int) -> dict[str, float]:
    import httpx

    def one(_: int) -> tuple[int, float]:
        started = time.perf_counter()
        response = client.post(
            f"{url}/v1/search", files={"image": ("q.jpg", image, "image/jpeg")}, data={"k": str(k)}
        )
        return response.status_code, time.perf_counter() - started

    with httpx.Client(timeout=60) as client, ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(min(requests, 2 * concurrency))))  # warm-up: batches, caches, connections
        started = time.perf_counter()
        results = list(pool.map(one, range(requests)))
        wall = time.perf_counter() - started
    latencies = sorted(d for _, d in results)
    return {
        "concurrency": concurrency,
        "requests": requests,
        "non_2xx": sum(not 200 <= s < 300 for s, _ in results),
        "p50_ms": statistics.median(latencies) * 1000,
        "p95_ms": latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))] * 1000,
        "requests_per_s": requests / wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--image", required=True, type=Path, help="query image file")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--k", type=int, default=10)
    args = parser.parse_args()
    image = args.image.read_bytes()
    print(f"{'conc':>5} {'requests':>8} {'non-2xx':>7} {'p50 ms':>8} {'p95 ms':>8} {'req/s':>7}")
    for level in args.concurrency:
        r = run_level(args.url, image, level, args.requests, args.k)
        print(
            f"{level:>5} {r['requests']:>8} {r['non_2xx']:>7} {r['p50_ms']:>8.1f} {r['p95_ms']:>8.1f} "
            f"{r['requests_per_s']:>7.1f}"
        )


if __name__ == "__main__":
    main()
