"""Self-contained HTML report of a composed-retrieval model: metrics, then a few queries with their top
results as inline images (green border: a correct answer; red: not)."""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping, Sequence
from typing import Any


def _figure(data: bytes | None, caption: str, ok: bool | None = None) -> str:
    border = {True: "#2a2", False: "#c33", None: "#888"}[ok]
    caption_html = f"<figcaption>{html.escape(caption)}</figcaption>"
    if data is None:
        return f'<figure style="border:3px solid {border}">(image unavailable){caption_html}</figure>'
    b64 = base64.b64encode(data).decode()
    return (
        f'<figure style="border:3px solid {border}"><img src="data:image/jpeg;base64,{b64}" width="96">'
        f"{caption_html}</figure>"
    )


def metrics_table(metrics: Mapping[str, float]) -> str:
    """One row per metric key (sorted); per-category keys go last."""
    keys = sorted(metrics, key=lambda k: ("category/" in k, k))
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{metrics[k]:.4f}</td></tr>" for k in keys)
    return f"<table><tr><th>metric</th><th>value</th></tr>{rows}</table>"


def comparison_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """A table of dicts (e.g. one row per model of a benchmark), floats with 4 decimals."""

    def cell(value: Any) -> str:
        return f"{value:.4f}" if isinstance(value, float) else html.escape(str(value))

    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{cell(r.get(c, ''))}</td>" for c in columns) + "</tr>" for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def examples_html(examples: Sequence[Mapping[str, Any]], images: Mapping[str, bytes]) -> str:
    """Each example: the reference and its text, then its ranked results."""
    parts = []
    for e in examples:
        relevant = set(e.get("relevant_ids", ()))
        cells = [_figure(images.get(e["reference_id"]), f"reference {e['reference_id']}")]
        cells += [
            _figure(images.get(hit), f"#{rank + 1} {hit}", hit in relevant)
            for rank, hit in enumerate(e.get("top_ids", []))
        ]
        parts.append(
            f"<h3>&ldquo;{html.escape(e['text'])}&rdquo; <small>({html.escape(e.get('kind', ''))})</small></h3>"
            f'<div style="display:flex;flex-wrap:wrap;gap:4px">{"".join(cells)}</div>'
        )
    return "".join(parts)


def render_report(
    title: str,
    metrics: Mapping[str, float],
    examples: Sequence[Mapping[str, Any]],
    images: Mapping[str, bytes],
    notes: Sequence[str] = (),
    extra_html: str = "",
) -> str:
    note_html = "".join(f"<p><b>{html.escape(n)}</b></p>" for n in notes)
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}figure{margin:0;padding:2px}"
        "figcaption{font-size:10px;max-width:96px;overflow:hidden}</style></head><body>"
        f"<h1>{html.escape(title)}</h1>{note_html}{extra_html}"
        + (f"<h2>Metrics (held-out products)</h2>{metrics_table(metrics)}" if metrics else "")
        + "<h2>Queries and their top results</h2>"
        "<p>Green border: a correct answer (same article type and the asked colour, or the asked colour "
        "variant of the product); red: not.</p>"
        f"{examples_html(examples, images)}</body></html>"
    )
