"""``visuray status`` without a job id: what exists under a runs root, and what a cluster serves.

Artifacts (catalogs, models, indexes, ...) are found by their ``LATEST`` file and read through
:func:`visuray.storage.resolve_artifact` (so only published versions count); Ray Train runs by their
``checkpoint_*`` folders (the latest checkpoint's step, and whether TensorBoard logs exist); sweeps by
their ``sweep.yaml`` (the job swept, the metric, and from ``results.csv`` once written, trials by status and
the best trial); Serve
applications from the connected cluster (``serve.status()``) or, from a CLI with no Ray connection, from
the dashboard's Serve API. Reads manifests and small state files only.
"""

from __future__ import annotations

import csv
import io
import json
import posixpath
from typing import Any

import yaml

from visuray.storage import (
    LATEST_NAME,
    VERSIONS_DIR,
    ArtifactError,
    StorageOptions,
    full_uri,
    get_filesystem,
    resolve_artifact,
)

MAX_DEPTH = 5  # runs/<kind>/<name>/... : deep enough for the configs' layouts, bounded on big buckets
_SKIP = {VERSIONS_DIR, "tensorboard", "engine", "__pycache__"}
SWEEP_FILE = (
    "sweep.yaml"  # what visuray.sweep.run writes first at a sweep's root (not imported: no Tune here)
)


def _walk(root: str, options: StorageOptions | None) -> tuple[list[str], list[str], list[str]]:
    """(artifact roots, Ray Train run folders, sweep roots) under ``root``, as URIs."""
    fs, base = get_filesystem(root, options)
    artifacts, runs, sweeps = [], [], []
    if not fs.exists(base):
        return artifacts, runs, sweeps
    base_depth = base.rstrip("/").count("/")
    for path, dirs, files in fs.walk(base, maxdepth=MAX_DEPTH, topdown=True):
        if LATEST_NAME in files:
            artifacts.append(full_uri(root, path))
            dirs.clear()  # an artifact's versions are not walked
            continue
        if any(d.startswith("checkpoint_") for d in dirs):
            runs.append(full_uri(root, path))
        if SWEEP_FILE in files:  # its trials' runs and models below are walked too
            sweeps.append(full_uri(root, path))
        keep = [d for d in dirs if d not in _SKIP and not d.startswith(("checkpoint_", "."))]
        dirs[:] = keep if path.rstrip("/").count("/") - base_depth < MAX_DEPTH else []
    return sorted(artifacts), sorted(runs), sorted(sweeps)


def _artifact_entry(uri: str, options: StorageOptions | None) -> dict[str, Any]:
    try:
        artifact = resolve_artifact(uri, options)
    except (ArtifactError, OSError, ValueError) as exc:
        return {"uri": uri, "kind": "unreadable", "error": str(exc)}
    meta = artifact.manifest.metadata
    entry = {
        "uri": uri,
        "kind": artifact.manifest.kind,
        "version": artifact.manifest.version,
        "created": artifact.manifest.created,
        "files": len(artifact.manifest.files),
    }
    for key in ("model_version", "embedding_dim", "dim", "count", "num_items", "factory", "trained_by"):
        if key in meta:
            entry[key] = meta[key]
    return entry


def _run_entry(uri: str, options: StorageOptions | None) -> dict[str, Any]:
    fs, path = get_filesystem(uri, options)
    checkpoints = sorted(  # folders only: Ray Train keeps a checkpoint_manager_snapshot.json beside them
        e["name"]
        for e in fs.ls(path, detail=True)
        if e["type"] == "directory" and posixpath.basename(e["name"]).startswith("checkpoint_")
    )
    entry: dict[str, Any] = {"uri": uri, "checkpoints": len(checkpoints), "latest_step": None}
    steps = []
    for ckpt in checkpoints:
        state = posixpath.join(ckpt, "train_state.json")
        try:
            steps.append(int(json.loads(fs.cat_file(state))["step"]))
        except (FileNotFoundError, KeyError, ValueError):
            continue
    if steps:
        entry["latest_step"] = max(steps)
    entry["tensorboard"] = fs.exists(posixpath.join(path, "tensorboard"))
    return entry


def _sweep_entry(uri: str, options: StorageOptions | None) -> dict[str, Any]:
    fs, path = get_filesystem(uri, options)
    try:
        spec = yaml.safe_load(fs.cat_file(posixpath.join(path, SWEEP_FILE))) or {}
    except (OSError, yaml.YAMLError) as exc:
        return {"uri": uri, "error": f"unreadable {SWEEP_FILE}: {exc}"}
    metric, mode = spec.get("metric"), spec.get("mode", "max")
    entry: dict[str, Any] = {
        "uri": uri,
        "job": spec.get("spec"),
        "metric": metric,
        "mode": mode,
        "num_samples": spec.get("num_samples"),
        "search_space": sorted(spec.get("search_space") or {}),
        "results": False,
    }
    table = posixpath.join(path, "results.csv")
    if not fs.exists(table):  # still running, or stopped before it wrote its table
        return entry
    rows = list(csv.DictReader(io.StringIO(fs.cat_file(table).decode())))
    entry["results"] = True
    entry["trials"] = {}
    for row in rows:
        entry["trials"][row["status"]] = entry["trials"].get(row["status"], 0) + 1
    scored = [
        r for r in rows if r["status"] == "completed" and r.get(f"last {metric}") not in (None, "", "nan")
    ]
    if scored:
        sign = 1 if mode == "max" else -1
        best = max(scored, key=lambda r: sign * float(r[f"last {metric}"]))
        entry["best"] = {"trial_id": best["trial_id"], metric: float(best[f"last {metric}"])}
    return entry


def deployments_overview(address: str | None = None) -> dict[str, Any]:
    """Serve applications and their deployments' status: from this process's Ray connection if there is
    one, else from the dashboard at ``address``; ``{"reachable": False, ...}`` when neither answers."""
    import ray

    try:
        if ray.is_initialized():
            from ray import serve

            status = serve.status()
            apps = {
                name: {
                    "status": str(app.status.value if hasattr(app.status, "value") else app.status),
                    "deployments": {
                        d: str(ds.status.value if hasattr(ds.status, "value") else ds.status)
                        for d, ds in app.deployments.items()
                    },
                }
                for name, app in status.applications.items()
            }
            return {"reachable": True, "applications": apps}
        from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

        from visuray.submission import dashboard_address

        details = ServeSubmissionClient(dashboard_address(address)).get_serve_details()
        apps = {
            name: {
                "status": app.get("status"),
                "deployments": {d: dd.get("status") for d, dd in (app.get("deployments") or {}).items()},
            }
            for name, app in (details.get("applications") or {}).items()
        }
        return {"reachable": True, "applications": apps}
    except Exception as exc:  # no cluster, no Serve, no dashboard: the overview still shows local state
        return {"reachable": False, "error": f"{type(exc).__name__}: {str(exc)[:200]}"}


def overview(
    root: str = "./runs",
    options: StorageOptions | None = None,
    address: str | None = None,
    include_cluster: bool = True,
) -> dict[str, Any]:
    """Artifacts grouped by kind (``model``, ``index``, ``catalog``, ...), training runs and deployments."""
    artifact_roots, run_dirs, sweep_roots = _walk(root, options)
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for uri in artifact_roots:
        entry = _artifact_entry(uri, options)
        by_kind.setdefault(entry["kind"], []).append(entry)
    result: dict[str, Any] = {
        "root": root,
        "artifacts": by_kind,
        "runs": [_run_entry(uri, options) for uri in run_dirs],
        "sweeps": [_sweep_entry(uri, options) for uri in sweep_roots],
    }
    if include_cluster:
        result["serve"] = deployments_overview(address)
    return result


def format_overview(data: dict[str, Any]) -> str:
    """A short human-readable rendering of :func:`overview`."""
    lines = [f"root: {data['root']}"]
    for kind, entries in sorted(data["artifacts"].items()):
        lines.append(f"{'indexes' if kind == 'index' else kind + 's'} ({len(entries)}):")
        for e in entries:
            extra = ", ".join(f"{k}={e[k]}" for k in ("model_version", "dim", "count", "error") if k in e)
            lines.append(f"  {e['uri']}  version {e.get('version', '-')}" + (f"  ({extra})" if extra else ""))
    if not data["artifacts"]:
        lines.append("no published artifacts")
    lines.append(f"training runs ({len(data['runs'])}):")
    for run in data["runs"]:
        tb = "  tensorboard" if run.get("tensorboard") else ""
        lines.append(f"  {run['uri']}  {run['checkpoints']} checkpoint(s), step {run['latest_step']}{tb}")
    lines.append(f"sweeps ({len(data['sweeps'])}):")
    for sweep in data["sweeps"]:
        if "error" in sweep:
            lines.append(f"  {sweep['uri']}  {sweep['error']}")
            continue
        head = f"  {sweep['uri']}  {sweep['job']}, {sweep['metric']} ({sweep['mode']})"
        if not sweep["results"]:
            lines.append(f"{head}: no results table yet (running or interrupted)")
            continue
        counts = ", ".join(f"{n} {status}" for status, n in sorted(sweep["trials"].items()))
        best = sweep.get("best")
        best_text = f"; best trial {best['trial_id']}: {best[sweep['metric']]:.4g}" if best else ""
        lines.append(f"{head}: {counts}{best_text}")
    serve = data.get("serve")
    if serve is not None:
        if not serve["reachable"]:
            lines.append(f"serve: no cluster reachable ({serve['error']})")
        else:
            lines.append(f"serve applications ({len(serve['applications'])}):")
            for name, app in serve["applications"].items():
                deps = ", ".join(f"{d} {s}" for d, s in app["deployments"].items())
                lines.append(f"  {name}: {app['status']}  [{deps}]")
    return "\n".join(lines)
