"""Mutation testing of the modules where a wrong number goes unnoticed, with mutmut, and its per-module table.

    pip install -c constraints.txt -e ".[mutation]"
    python tests/mutation/run.py                 # every module below; about an hour on 2 busy cores
    python tests/mutation/run.py losses dino     # some of them
    python tests/mutation/run.py --survivors     # after adding tests: re-test only the survivors
    python tests/mutation/run.py --report        # the table of the last run, running nothing

Not part of CI: it is slow. mutmut's settings are ``[tool.mutmut]`` in pyproject.toml.

mutmut imports the code it mutates from ``mutants/<source path>`` and names mutants after that path, so it
expects the package at the top of the project (``./visuray``) or under ``src/``. Here it lives under
``platform/``, which is not a package and whose name is the standard library's ``platform`` module. This
script therefore lays out a staging folder, ``.mutation/`` (git-ignored), with ``visuray``, ``tests``,
``jobs`` and ``pyproject.toml`` linked to the real ones, and runs mutmut there: the mutated copy lands in
``.mutation/mutants/visuray`` and is imported ahead of the editable install. A run re-tests every mutant of
the chosen modules (``--survivors``: only those the last run left alive) and keeps mutmut's generated copy
and test map; ``--fresh`` discards them first. A mutant's diff: ``cd .mutation && mutmut show <name>``.

Each module is a set of mutmut mutant-name patterns, so a module can be part of a file: only the loss,
centre and teacher-update functions of ``ssl/dino.py``, only the publish/verify/resolve path of
``storage.py`` (not its S3 options, URI helpers or small-file helpers), not the plotting of
``attributes/metrics.py``. The kill rate counts timeouts as kills; ``EQUIVALENT.md`` beside this script
lists the survivors that no test can kill, with the reason, and the table's last column leaves them out.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
STAGE = REPO / ".mutation"
EQUIVALENT = Path(__file__).resolve().parent / "EQUIVALENT.md"
# Staging folder entry -> what it links to, relative to the repository.
LINKS = {
    "visuray": "platform/visuray",
    "tests": "tests",
    "jobs": "jobs",
    "pyproject.toml": "pyproject.toml",
}


def _functions(module: str, *names: str) -> list[str]:
    """mutmut's names for the mutants of these functions (``Class.method`` for a method, ``Class.*`` for all)."""
    patterns = []
    for name in names:
        if "." in name:
            cls, method = name.split(".", 1)
            patterns.append(f"{module}.xǁ{cls}ǁ{method}__mutmut_*")
        else:
            patterns.append(f"{module}.x_{name}__mutmut_*")
    return patterns


MODULES: dict[str, list[str]] = {
    "metric_learning/losses": ["visuray.metric_learning.losses.*"],
    "metric_learning/samplers": ["visuray.metric_learning.samplers.*"],
    "ssl/dino (loss, centre, teacher EMA)": _functions(
        "visuray.ssl.dino",
        "_distributed",
        "dino_loss",
        "batch_center",
        "DINOLoss.*",
        "identity_param",
        "update_teacher",
    ),
    "evaluation/retrieval": ["visuray.evaluation.retrieval.*"],
    "evaluation/fewshot": ["visuray.evaluation.fewshot.*"],
    "evaluation/knn": ["visuray.evaluation.knn.*"],
    "attributes/metrics (not the plot)": _functions(
        "visuray.attributes.metrics",
        "_average_ranks",
        "roc_auc",
        "_descending_counts",
        "roc_curve",
        "average_precision",
        "multilabel_report",
        "micro_roc_curve",
        "relative_improvement",
    ),
    "storage (publish, verify, resolve)": _functions(
        "visuray.storage",
        "sha256_bytes",
        "_sha256_file",
        "Manifest.*",
        "Artifact.*",
        "ArtifactWriter.*",
        "_child",
        "_write_atomic",
        "resolve_artifact",
        "read_artifact_file",
        "verify_artifact",
    ),
}
SHORT_NAMES = {name.split(" ")[0].split("/")[-1]: name for name in MODULES}


@dataclass
class Tally:
    mutants: int = 0
    killed: int = 0
    timeout: int = 0
    survived: int = 0
    no_tests: int = 0
    other: int = 0
    equivalent: int = 0

    @property
    def detected(self) -> int:
        return self.killed + self.timeout

    def rate(self, less_equivalent: bool = False) -> float:
        total = self.mutants - (self.equivalent if less_equivalent else 0)
        return 100.0 * self.detected / total if total else float("nan")


def stage() -> None:
    """Create the staging folder's links (idempotent)."""
    STAGE.mkdir(exist_ok=True)
    for name, target in LINKS.items():
        link = STAGE / name
        if not link.is_symlink():
            link.symlink_to(Path("..") / target)


def run_mutmut(patterns: list[str], max_children: int) -> int:
    # One thread per process: the limit is meant to hold the whole run to --max-children cores, and
    # torch's and FAISS's thread pools would otherwise take every core in each mutant's process.
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    mutmut = shutil.which("mutmut", path=str(Path(sys.executable).parent)) or "mutmut"
    command = [mutmut, "run", "--max-children", str(max_children), *patterns]
    return subprocess.run(command, cwd=STAGE, env=env, check=False).returncode


def load_results() -> dict[str, int | None]:
    """Every mutant's exit code from mutmut's per-file result files (``None``: not run yet)."""
    results: dict[str, int | None] = {}
    for meta in (STAGE / "mutants").rglob("*.py.meta"):
        results.update(json.loads(meta.read_text())["exit_code_by_key"])
    return results


def _undetected(name: str, code: int | None, patterns: list[str]) -> bool:
    from mutmut.stats import status_by_exit_code

    in_scope = any(fnmatch.fnmatchcase(name, p) for p in patterns)
    return in_scope and status_by_exit_code[code] not in ("killed", "timeout")


def load_equivalent() -> set[str]:
    """The mutant names in EQUIVALENT.md: every backquoted ``...__mutmut_N`` on a line starting ``- ``."""
    if not EQUIVALENT.exists():
        return set()
    names: set[str] = set()
    for line in EQUIVALENT.read_text().splitlines():
        if line.startswith("- "):
            names.update(re.findall(r"`([^`]+__mutmut_\d+)`", line))
    return names


def _natural(item: tuple[str, int | None]) -> tuple[str, int]:
    """Sort mutants by function, then by number (``_2`` before ``_10``)."""
    function, _, number = item[0].rpartition("__mutmut_")
    return function, int(number)


def tally(modules: list[str]) -> tuple[dict[str, Tally], dict[str, list[str]]]:
    from mutmut.stats import status_by_exit_code

    results = load_results()
    equivalent = load_equivalent()
    tallies: dict[str, Tally] = {}
    unexplained: dict[str, list[str]] = {}
    for module in modules:
        t = Tally()
        for name, code in sorted(results.items(), key=_natural):
            if not any(fnmatch.fnmatchcase(name, p) for p in MODULES[module]):
                continue
            status = status_by_exit_code[code]
            t.mutants += 1
            if status == "killed":
                t.killed += 1
            elif status == "timeout":
                t.timeout += 1
            else:
                if status == "survived":
                    t.survived += 1
                elif status == "no tests":
                    t.no_tests += 1
                else:
                    t.other += 1
                if name in equivalent:
                    t.equivalent += 1
                else:
                    unexplained.setdefault(module, []).append(f"{name} ({status})")
        tallies[module] = t
    return tallies, unexplained


def print_table(tallies: dict[str, Tally]) -> None:
    header = (
        "module",
        "mutants",
        "killed",
        "timeout",
        "survived",
        "no tests",
        "kill rate",
        "equivalent",
        "rate less eq.",
    )
    rows = [
        (
            module,
            str(t.mutants),
            str(t.killed),
            str(t.timeout),
            str(t.survived),
            str(t.no_tests + t.other),
            f"{t.rate():.1f}%",
            str(t.equivalent),
            f"{t.rate(less_equivalent=True):.1f}%",
        )
        for module, t in tallies.items()
    ]
    total = Tally(*(sum(getattr(t, f) for t in tallies.values()) for f in Tally.__dataclass_fields__))
    rows.append(
        (
            "all",
            str(total.mutants),
            str(total.killed),
            str(total.timeout),
            str(total.survived),
            str(total.no_tests + total.other),
            f"{total.rate():.1f}%",
            str(total.equivalent),
            f"{total.rate(less_equivalent=True):.1f}%",
        )
    )
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print(
            "  ".join(
                cell.ljust(w) if i == 0 else cell.rjust(w)
                for i, (cell, w) in enumerate(zip(row, widths, strict=True))
            )
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="*", help=f"short names: {', '.join(SHORT_NAMES)} (default: all)")
    parser.add_argument("--max-children", type=int, default=1, help="mutants tested at once (default 1)")
    parser.add_argument("--fresh", action="store_true", help="discard the results of earlier runs first")
    parser.add_argument("--report", action="store_true", help="print the last results; run nothing")
    parser.add_argument(
        "--survivors",
        action="store_true",
        help="re-test only the mutants the last run did not kill (after adding tests)",
    )
    args = parser.parse_args(argv)
    unknown = [m for m in args.modules if m not in SHORT_NAMES]
    if unknown:
        parser.error(f"unknown module(s) {unknown}; choose from {', '.join(SHORT_NAMES)}")
    modules = [SHORT_NAMES[m] for m in args.modules] or list(MODULES)

    if args.fresh:
        shutil.rmtree(STAGE / "mutants", ignore_errors=True)
    stage()
    if not args.report:
        patterns = [p for m in modules for p in MODULES[m]]
        if args.survivors:
            # mutmut re-tests every mutant it is given by name, and only those.
            patterns = sorted(
                name for name, code in load_results().items() if _undetected(name, code, patterns)
            )
            if not patterns:
                print("no surviving mutants to re-test")
        code = run_mutmut(patterns, args.max_children) if patterns else 0
        if code != 0:
            print(f"mutmut exited with {code}", file=sys.stderr)
            return code

    tallies, unexplained = tally(modules)
    print()
    print_table(tallies)
    results = load_results()
    stale = sorted(n for n in load_equivalent() if n not in results or not _undetected(n, results[n], [n]))
    if stale:
        # Renumbered after a source change, or killed by a newer test: the entry needs a look.
        print(f"\n{EQUIVALENT.name} names {len(stale)} mutant(s) that do not survive: {', '.join(stale)}")
    for module, names in unexplained.items():
        print(f"\n{module}: {len(names)} surviving mutant(s) neither killed nor listed in {EQUIVALENT.name}:")
        for name in names:
            print(f"  {name}")
    return 1 if unexplained else 0


if __name__ == "__main__":
    sys.exit(main())
