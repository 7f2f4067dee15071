"""Held-out evaluation of a fusion model: embed the gallery and the composed queries, rank, and score
(:mod:`visuray.fusion.metrics`); a few ranked lists are kept for the HTML report.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from visuray.fusion.config import EvalSection
from visuray.fusion.data import FusionData, ImageTensorCache
from visuray.fusion.datasets import (
    ComposedQuery,
)

if TYPE_CHECKING:
    import numpy as np
    from torch import nn

    from visuray.fusion.tokenizer import TextTokenizer


def embed_gallery(
    model: nn.Module, cache: ImageTensorCache, item_ids: Sequence[str], batch_size: int
) -> np.ndarray:
    import numpy as np
    import torch

    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for i in range(0, len(item_ids), batch_size):
            out.append(
                model.encode_images(cache.batch(item_ids[i : i + batch_size]).to(device)).cpu().numpy()
            )
    return np.concatenate(out) if out else np.zeros((0, model.embed_dim), dtype=np.float32)


def embed_queries(
    model: nn.Module,
    cache: ImageTensorCache,
    tokenizer: TextTokenizer,
    queries: Sequence[ComposedQuery],
    batch_size: int,
) -> np.ndarray:
    import numpy as np
    import torch

    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for i in range(0, len(queries), batch_size):
            chunk = queries[i : i + batch_size]
            ids, padding = tokenizer([q.text for q in chunk])
            images = cache.batch([q.reference_id for q in chunk]).to(device)
            out.append(model.encode_queries(images, ids.to(device), padding.to(device)).cpu().numpy())
    return np.concatenate(out)


@dataclass
class HeldOutEvaluation:
    """What :func:`evaluate` measured: ``metrics`` keyed ``<split>/<metric>``, the report's
    ``examples``, and per query (in ``queries`` order) the 0-based rank of its first relevant item
    (``inf`` beyond the ranked depth), for query-by-query comparisons of models."""

    metrics: dict[str, float]
    examples: list[dict[str, Any]]
    queries: list[ComposedQuery]
    hit_ranks: Any  # np.ndarray (len(queries),)


def evaluate(
    model: nn.Module,
    cache: ImageTensorCache,
    tokenizer: TextTokenizer,
    data: FusionData,
    ev: EvalSection,
    split: str = "test",
) -> HeldOutEvaluation:
    """Recall@k per category, (R@10+R@50)/2 and CFQ-style metrics on the held-out products; plus the
    first ``ev.report_queries`` queries' top results (for the report) and each query's first-hit rank."""
    import numpy as np

    from visuray.fusion.datasets import labelled_pairs
    from visuray.fusion.metrics import cfq_metrics, composed_recall, first_hit_ranks

    was_training = model.training
    model.eval()
    items, queries = data.held_out(split)
    gallery_ids = [item.item_id for item in items]
    gallery = embed_gallery(model, cache, gallery_ids, ev.batch_size)
    query_vectors = embed_queries(model, cache, tokenizer, queries, ev.batch_size)
    metrics, rankings = composed_recall(
        query_vectors,
        gallery,
        gallery_ids,
        [q.reference_id for q in queries],
        [q.relevant_ids for q in queries],
        [q.category for q in queries],
        ks=ev.ks,
        exclude_reference=ev.exclude_reference,
    )
    for kind in sorted({q.kind for q in queries}):
        rows = [i for i, q in enumerate(queries) if q.kind == kind]
        kind_metrics, _ = composed_recall(
            query_vectors[rows],
            gallery,
            gallery_ids,
            [queries[i].reference_id for i in rows],
            [queries[i].relevant_ids for i in rows],
            [queries[i].category for i in rows],
            ks=ev.ks,
            exclude_reference=ev.exclude_reference,
        )
        metrics.update({f"kind/{kind}/{k}": v for k, v in kind_metrics.items() if "/" not in k})
    if ev.cfq_candidates_per_group > 0:
        pairs = labelled_pairs(queries, items, ev.cfq_candidates_per_group, seed=0)
        if pairs:
            position = {gid: i for i, gid in enumerate(gallery_ids)}
            scores = [
                float(np.dot(query_vectors[p.query_index], gallery[position[p.candidate_id]])) for p in pairs
            ]
            metrics.update(
                cfq_metrics(
                    scores,
                    [p.query_index for p in pairs],
                    [p.caption_match for p in pairs],
                    [p.image_similar for p in pairs],
                )
            )
    examples = [
        {
            "reference_id": queries[i].reference_id,
            "text": queries[i].text,
            "kind": queries[i].kind,
            "relevant_ids": list(queries[i].relevant_ids),
            "top_ids": [gallery_ids[j] for j in rankings[i][: ev.report_top_k] if j >= 0],
        }
        for i in _spread(len(queries), ev.report_queries)
    ]
    model.train(was_training)
    return HeldOutEvaluation(
        metrics={f"{split}/{k}": v for k, v in metrics.items()},
        examples=examples,
        queries=list(queries),
        hit_ranks=first_hit_ranks(rankings, gallery_ids, [q.relevant_ids for q in queries]),
    )


def _spread(count: int, n: int) -> list[int]:
    """Up to ``n`` indices spread over ``range(count)`` (both query kinds, several categories)."""
    if n <= 0 or count == 0:
        return []
    return list(range(0, count, max(1, count // n)))[:n]
