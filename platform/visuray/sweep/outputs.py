"""What a finished sweep leaves in its storage: the results table, the best job spec and the plots.

- ``results.parquet`` / ``results.csv``: one row per trial: its id, status (completed, stopped early by
  the scheduler, error, unfinished when the sweep was interrupted), every swept value (column named by its dotted key), the metric at the trial's
  last report and its best over the trial, the steps it trained, and its model when it completed.
- ``best.yaml``: the training job spec with the best trial's values, a spec ``visuray run`` accepts as it
  is. "Best" is the best metric at the last report among trials that trained to the end (ASHA stops
  trials early on purpose: a value reached at a low rung is not comparable with a finished run's).
- ``plots/<metric>_vs_<key>.png``: the metric at each trial's last report against each swept value.
"""

from __future__ import annotations

import io
import logging
import math
import re
from typing import Any

from visuray.storage import join, write_text
from visuray.sweep.prepare import trial_job_data

log = logging.getLogger(__name__)

COMPLETED, STOPPED, ERROR, UNFINISHED = "completed", "stopped early", "error", "unfinished"


def previous_statuses(root: str, options: Any) -> dict[str, str]:
    """trial id -> status in the results table an earlier run of this sweep left (none: empty)."""
    import pandas as pd

    from visuray.storage import exists, read_text

    table = join(root, "results.csv")
    if not exists(table, options):
        return {}
    frame = pd.read_csv(io.StringIO(read_text(table, options)), dtype={"trial_id": str})
    return dict(zip(frame["trial_id"], frame["status"], strict=True))


def trial_status(result: Any, model_published: bool, previous: str | None, max_steps: int | None) -> str:
    """How a trial ended. Its job publishes the model as its very last act, so a published model means
    it trained to the end. Tune marks the last result of a trial its scheduler stopped as done, in the
    run that stopped it; a trial restored from an earlier run keeps the status that run gave it."""
    if result.error is not None:
        return ERROR
    if model_published:
        return COMPLETED
    step = int((result.metrics or {}).get("step", 0) or 0)
    stopped = (result.metrics or {}).get("done") or previous == STOPPED
    if stopped and (max_steps is None or step < max_steps):
        return STOPPED
    return UNFINISHED  # cut off by an interruption of the sweep (or never started)


def trial_rows(grid: Any, prepared: Any, root: str, previous: dict[str, str]) -> list[dict[str, Any]]:
    """One row per trial of a ``ResultGrid``."""
    from visuray.storage import exists

    cfg = prepared.cfg
    sign = 1 if cfg.mode == "max" else -1
    rows = []
    for result in grid:
        metrics = result.metrics or {}
        history = result.metrics_dataframe
        values = []
        if history is not None and cfg.metric in history:
            values = [
                (float(v), int(s))
                for v, s in zip(history[cfg.metric], history["step"], strict=True)
                if v == v
            ]
        best_value, best_step = max(values, key=lambda p: sign * p[0]) if values else (math.nan, None)
        step = int(metrics.get("step", 0) or 0)
        trial_id = metrics.get("trial_id") or result.path.rstrip("/").rsplit("trial-", 1)[-1]
        model = join(root, "models", trial_id)
        published = exists(join(model, "LATEST"), cfg.storage)
        status = trial_status(result, published, previous.get(trial_id), prepared.max_steps)
        rows.append(
            {
                "trial_id": trial_id,
                "status": status,
                **{key: result.config.get(key) for key in cfg.search_space},
                "steps": step,
                f"last {cfg.metric}": float(metrics.get(cfg.metric, math.nan)),
                f"best {cfg.metric}": best_value,
                "best_step": best_step,
                "time_s": round(float(metrics.get("time_total_s", math.nan)), 1),
                "model": model if status == COMPLETED else None,
                "error": None if result.error is None else str(result.error).splitlines()[0][:300],
            }
        )
    return rows


def best_row(rows: list[dict[str, Any]], metric: str, mode: str) -> dict[str, Any] | None:
    """The completed trial with the best last metric (ties: the earlier trial)."""
    key = f"last {metric}"
    done = [r for r in rows if r["status"] == COMPLETED and r[key] == r[key]]
    if not done:
        return None
    sign = 1 if mode == "max" else -1
    return max(done, key=lambda r: sign * r[key])


def best_spec_yaml(prepared: Any, row: dict[str, Any]) -> str:
    """The job spec with the best values, validated, with a header saying where it came from."""
    from visuray.config import config_to_yaml, validate_config

    cfg = prepared.cfg
    params = {key: row[key] for key in cfg.search_space}
    data = trial_job_data(prepared, params, None, "")
    job_cfg = validate_config(prepared.kind.config_model(), data, f"best of sweep {cfg.name}")
    chosen = ", ".join(f"{k}={v!r}" for k, v in params.items())
    header = (
        f"# Best trial of sweep {cfg.name!r} (trial {row['trial_id']}): {cfg.metric} = {row[f'last {cfg.metric}']:.4f}"
        f" at step {row['steps']}.\n# Swept values: {chosen}.\n# Train it: visuray run best.yaml\n"
    )
    return header + config_to_yaml(job_cfg)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


def plot_metric(rows: list[dict[str, Any]], prepared: Any) -> dict[str, bytes]:
    """PNG per swept key: the metric at each trial's last report against the key's value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = prepared.cfg
    metric_col = f"last {cfg.metric}"
    colours = {COMPLETED: "tab:blue", STOPPED: "tab:orange", ERROR: "tab:red", UNFINISHED: "tab:grey"}
    plots = {}
    for key, spec in cfg.search_space.items():
        fig, ax = plt.subplots(figsize=(5, 3.5))
        points = [(r[key], r[metric_col], r["status"]) for r in rows if r[metric_col] == r[metric_col]]
        numeric = all(isinstance(x, int | float) and not isinstance(x, bool) for x, _, _ in points)
        if numeric:
            xs = [x for x, _, _ in points]
        else:  # categorical values: one column each, in the order the space lists them
            order = [str(v) for v in (spec.values or [])] or sorted({str(x) for x, _, _ in points})
            xs = [order.index(str(x)) for x, _, _ in points]
            ax.set_xticks(range(len(order)), order, rotation=20)
        for status, colour in colours.items():
            chosen = [(x, y) for x, (_, y, s) in zip(xs, points, strict=True) if s == status]
            if chosen:
                ax.scatter(*zip(*chosen, strict=True), color=colour, label=status)
        if numeric and spec.log_scale:
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(f"{cfg.metric} (last report)")
        ax.set_title(f"{cfg.name}: {cfg.metric} vs {key}", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100)
        plt.close(fig)
        plots[f"{_slug(cfg.metric)}_vs_{_slug(key)}.png"] = buffer.getvalue()
    return plots


def write_outputs(grid: Any, prepared: Any, root: str) -> dict[str, Any]:
    """Write the table, best spec and plots under ``root``; return the sweep's summary."""
    import pandas as pd

    from visuray.storage import get_filesystem

    cfg = prepared.cfg
    rows = trial_rows(grid, prepared, root, previous_statuses(root, cfg.storage))
    frame = pd.DataFrame(rows)
    for column in cfg.search_space:  # mixed-type choices (e.g. null and numbers) must still fit Parquet
        if frame[column].map(type).nunique() > 1:
            frame[column] = frame[column].map(repr)
    fs, path = get_filesystem(root, cfg.storage)
    fs.makedirs(f"{path}/plots", exist_ok=True)
    with fs.open(f"{path}/results.parquet", "wb") as f:
        frame.to_parquet(f, index=False)
    write_text(join(root, "results.csv"), frame.to_csv(index=False), cfg.storage)
    plots = plot_metric(rows, prepared)
    for name, data in plots.items():
        with fs.open(f"{path}/plots/{name}", "wb") as f:
            f.write(data)
    best = best_row(rows, cfg.metric, cfg.mode)
    if best is not None:
        write_text(join(root, "best.yaml"), best_spec_yaml(prepared, best), cfg.storage)
    else:
        log.warning("no trial of sweep %s trained to the end: no best.yaml", cfg.name)
    counts = {
        status: sum(r["status"] == status for r in rows) for status in (COMPLETED, STOPPED, ERROR, UNFINISHED)
    }
    return {
        "sweep": root,
        "trials": len(rows),
        "completed": counts[COMPLETED],
        "stopped_early": counts[STOPPED],
        "errors": counts[ERROR],
        "unfinished": counts[UNFINISHED],
        "steps_trained": int(sum(r["steps"] for r in rows)),
        "best": None
        if best is None
        else {
            "trial_id": best["trial_id"],
            cfg.metric: best[f"last {cfg.metric}"],
            "values": {k: best[k] for k in cfg.search_space},
            "model": best["model"],
        },
        "results": join(root, "results.csv"),
        "best_spec": join(root, "best.yaml") if best is not None else None,
        "plots": [join(root, "plots", name) for name in plots],
    }
