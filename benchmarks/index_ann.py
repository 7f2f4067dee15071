"""Approximate FAISS indexes (IVF-PQ, HNSW) against exact search: recall@10, queries per second, build time.

Question: at 1M x 128 float32, which IVF-PQ / HNSW search settings give >= 10x the exact (Flat) search's
queries per second, and at what recall@10?

Protocol
--------
- Data: no real 1M-vector embedding set exists here, so the vectors are synthetic and clustered: a
  Gaussian mixture of ``--centres`` (3,000) random unit centres; each vector is a centre plus noise of
  norm about ``--noise`` (1.0), then normalised to unit length. The noise is anisotropic (standard
  deviation of component ``i`` proportional to ``1/sqrt(i)`` in a random orthonormal basis) because learned
  embeddings spend their variance in few directions; isotropic noise in 128 dimensions makes every
  member of a cluster nearly equidistant (``--spectrum iso`` measures that variant). Fixed seed.
  ``--n`` base vectors, ``--queries`` query vectors drawn from the same mixture (not in the base).
- Metric: inner product on unit vectors (``metric="ip"``), the metric the platform's indexes use.
- Every index is built with the platform's own builder,
  :func:`visuray.index.faiss_index.build_faiss_index` (factory string, default training sample of
  262,144 vectors, seed 0); build time = train + add, wall clock. HNSW uses FAISS's default
  efConstruction (40).
- Ground truth: the exact top 10 of each query from the ``Flat`` index. recall@10 = |ANN top 10 ∩ exact
  top 10| / 10, averaged over queries.
- QPS: the same query batch for every index and setting, one ``index.search(queries, 10)`` call per
  measurement, ``faiss.omp_set_num_threads(--threads)`` for all; ``--rounds`` rounds, each round times
  every setting (Flat included) once, interleaved; the median per setting is reported, and the speed-up
  is that median against the median exact QPS. Each ANN index is timed right after its build, against
  Flat again (IVF-PQ first, then HNSW), and the results are written before the next build. Settings with a speed-up >= 10 are marked.
  ``--indexes hnsw`` (or ``ivf``) runs one phase only (Flat always runs), written to a file of its own.
- Run under ``flock /tmp/visuray-timing.lock`` on the shared machine; the load average is printed.

Run:  flock /tmp/visuray-timing.lock .venv/bin/python benchmarks/index_ann.py --n 1000000 --dim 128 \
          --threads 2 --out runs/benchmarks/index_ann
      (HNSW only: add ``--indexes hnsw``)
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


def clustered_vectors(
    n: int, dim: int, centres: np.ndarray, basis: np.ndarray, noise: float, spectrum: str, rng: Any
) -> np.ndarray:
    """``n`` unit vectors of the Gaussian mixture around ``centres`` (see the module docstring)."""
    decay = 1.0 / np.sqrt(np.arange(1, dim + 1, dtype=np.float64))
    scale = decay if spectrum == "decay" else np.ones(dim)
    # Expected squared noise norm = noise**2 in both variants.
    scale = (noise * scale / np.sqrt((scale**2).sum())).astype(np.float32)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 65_536):
        stop = min(start + 65_536, n)
        labels = rng.integers(0, len(centres), size=stop - start)
        block = centres[labels] + (rng.standard_normal((stop - start, dim), dtype=np.float32) * scale) @ basis
        out[start:stop] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def make_data(
    n: int, num_queries: int, dim: int, num_centres: int, noise: float, spectrum: str, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((num_centres, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    basis = np.linalg.qr(rng.standard_normal((dim, dim)))[0].astype(np.float32)
    base = clustered_vectors(n, dim, centres, basis, noise, spectrum, rng)
    queries = clustered_vectors(num_queries, dim, centres, basis, noise, spectrum, rng)
    return base, queries


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    k = truth.shape[1]
    hits = sum(len(set(f[f >= 0].tolist()) & set(t.tolist())) for f, t in zip(found, truth, strict=True))
    return hits / (k * len(truth))


def set_search_param(index: Any, name: str, value: int) -> None:
    import faiss

    if name == "nprobe":
        faiss.extract_index_ivf(index).nprobe = value
    elif name == "efSearch":
        index.hnsw.efSearch = value


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--centres", type=int, default=3000)
    parser.add_argument("--noise", type=float, default=1.0)
    parser.add_argument("--spectrum", choices=["decay", "iso"], default="decay")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ivf", default="IVF4096,PQ32", help="IVF-PQ factory string")
    parser.add_argument("--nprobe", type=int, nargs="+", default=[4, 8, 16, 32, 64, 128])
    parser.add_argument("--hnsw", default="HNSW32", help="HNSW factory string")
    parser.add_argument("--ef-search", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    parser.add_argument(
        "--indexes",
        choices=["ivf", "hnsw"],
        nargs="+",
        default=["ivf", "hnsw"],
        help="which ANN phases to run (Flat always runs: it is the ground truth and the QPS reference)",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/benchmarks/index_ann"))
    args = parser.parse_args()

    import faiss

    faiss.omp_set_num_threads(args.threads)
    started = time.perf_counter()
    base, queries = make_data(
        args.n, args.queries, args.dim, args.centres, args.noise, args.spectrum, args.seed
    )
    print(
        f"data: {args.n:,} x {args.dim} base, {args.queries:,} queries in {time.perf_counter() - started:.1f}s"
    )

    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / results_name(args.spectrum, args.n, args.indexes)
    result: dict[str, Any] = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "builds": {},
        "phases": [],
        "faiss_version": faiss.__version__,
    }
    indexes = {"Flat": build(base, "Flat", result)}
    _, truth = indexes["Flat"].search(queries, 10)

    # One phase per ANN index: build it, then time it against Flat in interleaved rounds, and write the
    # results before the next (slow) build, so that a run cut short still reports what it measured.
    phases = {
        "ivf": (args.ivf, "nprobe", args.nprobe),
        "hnsw": (args.hnsw, "efSearch", args.ef_search),
    }
    for factory, param, values in (phases[name] for name in phases if name in args.indexes):
        indexes[factory] = build(base, factory, result)
        # (label, index name, parameter name, value): every setting searched with the same query batch.
        settings = [("Flat (exact)", "Flat", "", 0)]
        settings += [(f"{factory} {param}={v}", factory, param, v) for v in values]
        result["phases"].append(time_settings(indexes, settings, queries, truth, args.rounds, args.threads))
        path.write_text(json.dumps(result, indent=2))
        print(f"wrote {path}", flush=True)
        del indexes[factory]  # frees its memory before the next build


def results_name(spectrum: str, n: int, indexes: list[str]) -> str:
    """The results file; a run of a subset of the phases gets its own, so it never overwrites a full run's."""
    subset = "" if {"ivf", "hnsw"} <= set(indexes) else "_" + "-".join(sorted(set(indexes)))
    return f"results_{spectrum}_n{n}{subset}.json"


def build(base: np.ndarray, factory: str, result: dict[str, Any]) -> Any:
    from visuray.index.faiss_index import build_faiss_index

    started = time.perf_counter()
    index = build_faiss_index(base, factory=factory, metric="ip", use_gpu=False, seed=0)
    seconds = time.perf_counter() - started
    result["builds"][factory] = {"build_s": round(seconds, 1), "load_avg": os.getloadavg()}
    print(f"built {factory}: {seconds:.1f}s (load average {os.getloadavg()[0]:.1f})", flush=True)
    return index


def time_settings(
    indexes: dict[str, Any],
    settings: list[tuple[str, str, str, int]],
    queries: np.ndarray,
    truth: np.ndarray,
    rounds: int,
    threads: int,
) -> dict[str, Any]:
    """Recall@10 and median QPS of every setting, timed in ``rounds`` interleaved rounds."""
    recalls: dict[str, float] = {}
    times: dict[str, list[float]] = {label: [] for label, *_ in settings}
    loads = []
    for _ in range(rounds):
        for label, name, param, value in settings:
            index = indexes[name]
            set_search_param(index, param, value)
            started = time.perf_counter()
            _, found = index.search(queries, 10)
            times[label].append(time.perf_counter() - started)
            recalls[label] = recall_at_k(found, truth)
        loads.append(os.getloadavg()[0])

    num = len(queries)
    exact_qps = num / statistics.median(times["Flat (exact)"])
    rows = []
    print(f"\nthreads {threads}, {num} queries per call, median of {rounds} rounds")
    print(f"{'setting':<32} {'recall@10':>9} {'QPS':>10} {'x exact':>8}  >=10x")
    for label, *_ in settings:
        qps = num / statistics.median(times[label])
        rows.append(
            {
                "setting": label,
                "recall@10": round(recalls[label], 4),
                "qps": round(qps, 1),
                "speedup": round(qps / exact_qps, 2),
                "meets_10x": qps / exact_qps >= 10,
                "seconds": [round(t, 4) for t in times[label]],
            }
        )
        mark = "yes" if qps / exact_qps >= 10 else ""
        print(f"{label:<32} {recalls[label]:>9.4f} {qps:>10.1f} {qps / exact_qps:>8.2f}  {mark}")
    print(f"load average during the rounds: {loads}", flush=True)
    return {"rows": rows, "load_avg_rounds": loads}


if __name__ == "__main__":
    main()
