"""Few-shot N-way K-shot classification of frozen embeddings, averaged over many random episodes.

An episode draws N classes, K support and Q query items of each; a head fitted on the support set labels
the queries. Two heads: *prototype* (nearest class mean by cosine similarity, as in Prototypical
Networks) and *logistic regression* (a multinomial linear classifier with L2 regularisation fitted on the
support embeddings). The result is the mean accuracy with a 95% confidence interval (1.96 standard errors)
over the episodes. All episodes are evaluated at once as batched tensors: 600 episodes take seconds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from visuray.evaluation.knn import l2_normalise


@dataclass(frozen=True)
class Episodes:
    """Item indices of each episode: ``support`` is ``(E, N, K)``, ``query`` is ``(E, N, Q)``; the class of
    way ``n`` is ``classes[e, n]`` (an index into the sorted unique labels)."""

    support: np.ndarray
    query: np.ndarray
    classes: np.ndarray


def sample_episodes(
    labels: Sequence[Any], n_way: int, k_shot: int, n_query: int, episodes: int, seed: int = 0
) -> Episodes:
    """Draw ``episodes`` episodes among the classes that have at least ``k_shot + n_query`` items."""
    rng = np.random.default_rng(seed)
    labels_arr = np.asarray(labels)
    _, codes = np.unique(labels_arr, return_inverse=True)
    members = [np.flatnonzero(codes == c) for c in range(codes.max() + 1)] if len(codes) else []
    eligible = np.array([c for c, m in enumerate(members) if len(m) >= k_shot + n_query], dtype=np.int64)
    if len(eligible) < n_way:
        raise ValueError(
            f"{n_way}-way {k_shot}-shot with {n_query} queries needs {n_way} classes of at least "
            f"{k_shot + n_query} items; only {len(eligible)} qualify"
        )
    classes = np.stack([rng.choice(eligible, n_way, replace=False) for _ in range(episodes)])
    items = np.empty((episodes, n_way, k_shot + n_query), dtype=np.int64)
    for e in range(episodes):
        for n, c in enumerate(classes[e]):
            items[e, n] = rng.choice(members[c], k_shot + n_query, replace=False)
    return Episodes(items[:, :, :k_shot], items[:, :, k_shot:], classes)


def _episode_tensors(features: np.ndarray, episodes: Episodes) -> tuple[Any, Any, Any]:
    import torch

    feats = torch.from_numpy(l2_normalise(features))
    e, n, k = episodes.support.shape
    q = episodes.query.shape[2]
    support = feats[torch.from_numpy(episodes.support)]  # (E, N, K, D)
    query = feats[torch.from_numpy(episodes.query)].reshape(e, n * q, -1)  # (E, N*Q, D)
    truth = torch.arange(n).repeat_interleave(q).expand(e, n * q)  # way index of each query
    return support, query, truth


def prototype_accuracies(features: np.ndarray, episodes: Episodes) -> np.ndarray:
    """Per-episode accuracy of the nearest-prototype head (cosine similarity to the class means)."""
    import torch
    from torch.nn import functional as F

    support, query, truth = _episode_tensors(features, episodes)
    prototypes = F.normalize(support.mean(dim=2), dim=-1)  # (E, N, D)
    logits = torch.einsum("eqd,end->eqn", query, prototypes)
    return (logits.argmax(-1) == truth).float().mean(-1).numpy()


def logistic_regression_accuracies(
    features: np.ndarray, episodes: Episodes, l2: float = 1e-3, iterations: int = 100, scale: float = 10.0
) -> np.ndarray:
    """Per-episode accuracy of multinomial logistic regression fitted on each episode's support set.

    All episodes' classifiers are fitted at once by full-batch Adam on the sum of their losses: the
    episodes share no parameters, so each one's gradient is its own problem's (a joint L-BFGS couples
    the episodes through its line search and is ~30x slower). ``scale`` multiplies the unit-norm
    features (a fixed temperature) so that moderate weights separate the support set; ``l2`` keeps
    1-shot problems (always separable) from pushing weights to infinity. 100 steps at lr 0.1 from zero
    weights fit 5-way support sets of unit vectors (features are fixed, the problems are convex).
    """
    import torch
    from torch.nn import functional as F

    support, query, truth = _episode_tensors(features, episodes)
    e, n, k, d = support.shape
    x = support.reshape(e, n * k, d) * scale
    y = torch.arange(n).repeat_interleave(k).expand(e, n * k).reshape(-1)
    weight = torch.zeros(e, d, n, requires_grad=True)
    bias = torch.zeros(e, 1, n, requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=0.1)
    for _ in range(iterations):
        logits = torch.bmm(x, weight) + bias
        # per-episode mean cross-entropy, summed over episodes: independent problems, one backward
        loss = F.cross_entropy(logits.reshape(-1, n), y, reduction="sum") / (n * k)
        loss = loss + l2 * weight.pow(2).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        logits = torch.bmm(query * scale, weight) + bias
    return (logits.argmax(-1) == truth).float().mean(-1).numpy()


HEADS = {"prototype": prototype_accuracies, "logreg": logistic_regression_accuracies}


def mean_ci95(values: np.ndarray) -> tuple[float, float]:
    """Mean and half-width of its 95% confidence interval (1.96 standard errors)."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        return float(values.mean()) if len(values) else 0.0, float("nan")
    return float(values.mean()), float(1.96 * values.std(ddof=1) / np.sqrt(len(values)))


def fewshot_accuracy(
    features: np.ndarray,
    labels: Sequence[Any],
    n_way: int = 5,
    shots: Sequence[int] = (1, 5),
    n_query: int = 15,
    episodes: int = 600,
    heads: Sequence[str] = ("prototype", "logreg"),
    seed: int = 0,
) -> dict[str, float]:
    """``fewshot/<N>way<K>shot/<head>`` mean accuracy and ``..._ci95`` for each shot count and head.

    Both heads see the same episodes (same seed per shot count), so their difference is paired.
    """
    unknown = [h for h in heads if h not in HEADS]
    if unknown:
        raise ValueError(f"unknown few-shot head(s) {unknown}; choose from {sorted(HEADS)}")
    out: dict[str, float] = {}
    for k_shot in shots:
        sampled = sample_episodes(labels, n_way, k_shot, n_query, episodes, seed + k_shot)
        for head in heads:
            mean, ci = mean_ci95(HEADS[head](features, sampled))
            key = f"fewshot/{n_way}way{k_shot}shot/{head}"
            out[key] = mean
            out[f"{key}_ci95"] = ci
    out["fewshot/episodes"] = float(episodes)
    out["fewshot/queries_per_class"] = float(n_query)
    return out
