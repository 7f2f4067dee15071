"""Peak memory and time of the chunked FAISS retrieval metrics, beside the naive N x N computation.

Protocol
--------
- Data: random clustered embeddings, ``n`` unit vectors of ``dim`` float32 in ``n / class_size`` classes
  (class centres ~ N(0, I), points = centre + ``noise`` * N(0, I), normalised), generated in blocks with
  a fixed seed, so both methods see identical inputs.
- Each measurement runs in a fresh Python process (this script re-invokes itself with ``--worker``), so
  peak RSS (``getrusage(RUSAGE_SELF).ru_maxrss``) belongs to that method alone. Reported: wall time of the
  metric computation, peak RSS of the process, and the RSS already taken by the embeddings before it.
- Methods, both leave-one-out Recall@1/5/10 and MAP@R by class:
  ``chunked``: :func:`visuray.evaluation.retrieval.retrieval_metrics` (exact FAISS inner-product search,
  ``chunk_size`` queries at a time); ``naive``: the full N x N similarity matrix in numpy, then the top of
  each row by ``argpartition``/``argsort`` (the usual notebook approach).
- The naive method runs only at ``--naive-n`` (default 10,000: a 400 MB matrix), where it fits; the chunked
  method runs there too (for the ratio in the same run) and at ``--n`` (default 100,000 x 512, which must
  stay within 4 GiB).

Run:  python benchmarks/retrieval_memory.py [--n 100000] [--dim 512] [--naive-n 10000] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np


def clustered_embeddings(n: int, dim: int, class_size: int, noise: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    num_classes = max(2, n // class_size)
    labels = rng.integers(0, num_classes, size=n)
    centres = rng.standard_normal((num_classes, dim), dtype=np.float32)
    x = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 8192):
        stop = min(start + 8192, n)
        block = centres[labels[start:stop]] + noise * rng.standard_normal(
            (stop - start, dim), dtype=np.float32
        )
        x[start:stop] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return x, labels


def naive_metrics(x: np.ndarray, labels: np.ndarray, ks=(1, 5, 10)) -> dict[str, float]:
    """Leave-one-out metrics from the full similarity matrix (what the chunked version avoids)."""
    sims = x @ x.T  # N x N float32
    np.fill_diagonal(sims, -np.inf)
    sizes = np.bincount(labels)
    relevant = sizes[labels] - 1
    depth = int(max(max(ks), relevant.max()))
    top = np.argpartition(-sims, depth, axis=1)[:, :depth]
    order = np.take_along_axis(sims, top, axis=1).argsort(axis=1)[:, ::-1]
    top = np.take_along_axis(top, order, axis=1)
    rel = labels[top] == labels[:, None]
    out = {f"recall@{k}": float(rel[:, :k].any(axis=1).mean()) for k in ks}
    ranks = np.arange(1, depth + 1)
    ap = (np.cumsum(rel, axis=1) / ranks * rel * (ranks <= relevant[:, None])).sum(axis=1) / np.maximum(
        relevant, 1
    )
    out["map@r"] = float(ap[relevant > 0].mean())
    return out


def worker(method: str, n: int, dim: int, class_size: int, noise: float, chunk_size: int) -> dict:
    x, labels = clustered_embeddings(n, dim, class_size, noise)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    started = time.perf_counter()
    if method == "chunked":
        from visuray.evaluation.retrieval import retrieval_metrics

        metrics = retrieval_metrics(x, labels, ks=(1, 5, 10), chunk_size=chunk_size)
    else:
        metrics = naive_metrics(x, labels)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "method": method,
        "n": n,
        "dim": dim,
        "seconds": round(seconds, 2),
        "peak_rss_mib": round(peak / 2**20, 1),
        "embeddings_rss_mib": round(rss_before / 2**20, 1),
        "recall@1": round(metrics["recall@1"], 4),
        "map@r": round(metrics["map@r"], 4),
    }


def run(method: str, n: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", method, "--n", str(n), "--dim", str(args.dim),
           "--class-size", str(args.class_size), "--noise", str(args.noise), "--chunk-size", str(args.chunk_size)]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), OPENBLAS_NUM_THREADS=str(args.threads))
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--naive-n", type=int, default=10_000)
    parser.add_argument("--class-size", type=int, default=50, help="items per class (R + 1 for MAP@R)")
    parser.add_argument("--noise", type=float, default=1.5)
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", choices=["chunked", "naive"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.n, args.dim, args.class_size, args.noise, args.chunk_size)))
        return
    rows = [
        run("naive", args.naive_n, args),
        run("chunked", args.naive_n, args),
        run("chunked", args.n, args),
    ]
    print(f"{'method':<8} {'n':>7} {'dim':>4} {'time s':>8} {'peak RSS MiB':>13} {'RSS before':>14} "
          f"{'R@1':>6} {'MAP@R':>6}")  # fmt: skip
    for r in rows:
        print(f"{r['method']:<8} {r['n']:>7} {r['dim']:>4} {r['seconds']:>8} {r['peak_rss_mib']:>13} "
              f"{r['embeddings_rss_mib']:>14} {r['recall@1']:>6} {r['map@r']:>6}")  # fmt: skip
    naive, same = rows[0], rows[1]
    print(f"\nat n={args.naive_n}: chunked / naive peak RSS = {same['peak_rss_mib'] / naive['peak_rss_mib']:.2f}, "
          f"time = {same['seconds'] / naive['seconds']:.2f}; metrics agree: "
          f"{abs(same['recall@1'] - naive['recall@1']) < 1e-3 and abs(same['map@r'] - naive['map@r']) < 1e-3}")  # fmt: skip
    big = rows[2]
    print(
        f"at n={args.n} x {args.dim}: peak RSS {big['peak_rss_mib'] / 1024:.2f} GiB "
        f"({'within' if big['peak_rss_mib'] < 4096 else 'OVER'} the 4 GiB budget)"
    )


if __name__ == "__main__":
    main()
