"""Margins between trained rows pooled over seeds, from the per-query files of finetune_quality.py and
cross_domain.py runs that differ only in ``--seed``.

Protocol
--------
- Input: the ``*_per_query.npz`` files those benchmarks write (one per run), and the pairs of rows to
  compare. A row is named as in the file: ``"(a) pretrained + multi-similarity"`` for finetune_quality's
  task (a), ``"pretrained + multi-similarity"`` for cross_domain. A row found in several files is a row
  trained with several seeds; an untrained row (raw pixels, pretrained as is) is in the seed-0 file only.
- Each query's value of a row (hit@1, AP@R) is averaged over the row's seeds; the margin of a pair is the
  mean over queries of the difference of those averages, with a paired 95% interval from the same
  bootstrap over queries as the benchmarks (``finetune_quality.bootstrap_counts``, 2,000 resamples,
  seed 0). The interval is over queries only: the per-seed margins are printed beside it so that the
  seed-to-seed spread stays visible (a claim that flips sign between seeds is not a claim).

Run:  python benchmarks/seed_margins.py runs/bench-pc400/cross_domain_test_*_per_query.npz \\
          --pair "pretrained + ATL (title clusters)" "pretrained + triplet batch-all"
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from finetune_quality import METRIC_KEYS, bootstrap_counts, paired_margin  # noqa: E402

PerQuery = dict[str, dict[str, np.ndarray]]  # row -> metric key (hit@1, ap@r) -> one value per query


def read_runs(paths: list[str]) -> list[PerQuery]:
    """Each file's rows; a key of a file is ``"<row> <metric key>"`` (the metric key has no space)."""
    runs = []
    for path in paths:
        rows: PerQuery = {}
        with np.load(path) as data:
            for key in data.files:
                row, metric = key.rsplit(" ", 1)
                rows.setdefault(row, {})[metric] = data[key]
        runs.append(rows)
    return runs


def seed_values(runs: list[PerQuery], row: str) -> list[dict[str, np.ndarray]]:
    """The row's per-query values in every run that has it (one entry per seed)."""
    found = [run[row] for run in runs if row in run]
    if not found:
        known = sorted({name for run in runs for name in run})
        raise SystemExit(f"no row {row!r} in the files; rows: {known}")
    return found


def pooled_margin(runs: list[PerQuery], row: str, other: str, counts: np.ndarray) -> dict[str, object]:
    """The seed-averaged paired margin of ``row`` over ``other`` and the per-seed point margins."""
    mine, theirs = seed_values(runs, row), seed_values(runs, other)
    out: dict[str, object] = {"row": row, "over": other, "seeds": (len(mine), len(theirs))}
    for metric, key in METRIC_KEYS.items():
        a = np.mean([values[key] for values in mine], axis=0)
        b = np.mean([values[key] for values in theirs], axis=0)
        out[metric] = paired_margin(a, b, counts)
        # Per seed: the row's seed i against the other's seed i (or its only run, for an untrained row).
        out[f"{metric} per seed"] = [
            float(np.nanmean(m[key] - theirs[min(i, len(theirs) - 1)][key])) for i, m in enumerate(mine)
        ]
    return out


def markdown(margins: list[dict[str, object]]) -> str:
    lines = [
        "| row | over | seeds | Recall@1 margin [95%] (per seed) | MAP@R margin [95%] (per seed) |",
        "|---|---|---|---|---|",
    ]
    for m in margins:
        cells = []
        for metric in METRIC_KEYS:
            pooled = m[metric]
            assert isinstance(pooled, dict)
            lo, hi = pooled["ci95"]
            per_seed = ", ".join(f"{v:+.3f}" for v in m[f"{metric} per seed"])  # type: ignore[attr-defined]
            cells.append(f"{pooled['margin']:+.3f} [{lo:+.3f}, {hi:+.3f}] ({per_seed})")
        seeds = m["seeds"]
        assert isinstance(seeds, tuple)
        lines.append(f"| {m['row']} | {m['over']} | {seeds[0]} / {seeds[1]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict[str, object]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", help="*_per_query.npz of runs that differ only in --seed")
    parser.add_argument(
        "--pair", nargs=2, action="append", required=True, metavar=("ROW", "OVER"), help="rows to compare"
    )
    args = parser.parse_args(argv)
    runs = read_runs(args.files)
    margins = []
    for row, other in args.pair:
        # A file may hold several tasks (finetune_quality's (a) and (b)): only a pair's rows must agree.
        sizes = {len(values["hit@1"]) for name in (row, other) for values in seed_values(runs, name)}
        if len(sizes) != 1:
            raise SystemExit(
                f"{row!r} and {other!r} score different query sets (sizes {sorted(sizes)}); "
                "compare like with like"
            )
        margins.append(pooled_margin(runs, row, other, bootstrap_counts(sizes.pop())))
    print(markdown(margins))
    return margins


if __name__ == "__main__":
    main()
