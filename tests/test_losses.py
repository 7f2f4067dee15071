"""The vectorised triplet loss against a brute-force loop over explicitly listed triplets."""

from __future__ import annotations

import itertools

import pytest
import torch

from visuray.losses import (
    BatchHardMiner,
    TripletMarginLoss,
    cosine_distance_matrix,
    euclidean_distance_matrix,
)

pytestmark = pytest.mark.unit


def _pair_distance(a: torch.Tensor, b: torch.Tensor, distance: str) -> torch.Tensor:
    if distance == "cosine":
        return 1.0 - torch.dot(a, b) / (a.norm() * b.norm())
    return (a - b).norm()


def brute_force_batch_hard(
    embeddings: torch.Tensor, labels: list[int], margin: float, distance: str
) -> torch.Tensor:
    """For every anchor, list all (positive, negative) pairs, take the largest hinge; average over anchors."""
    per_anchor = []
    n = len(labels)
    for a in range(n):
        positives = [p for p in range(n) if p != a and labels[p] == labels[a]]
        negatives = [q for q in range(n) if labels[q] != labels[a]]
        hinges = [
            torch.relu(
                _pair_distance(embeddings[a], embeddings[p], distance)
                - _pair_distance(embeddings[a], embeddings[q], distance)
                + margin
            )
            for p, q in itertools.product(positives, negatives)
        ]
        if hinges:
            per_anchor.append(torch.stack(hinges).max())
    return torch.stack(per_anchor).mean()


@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batch_hard_matches_brute_force_value_and_gradient(distance: str, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    # Unbalanced batch with a singleton class (label 3: an anchor with no positive is left out).
    labels = [0, 0, 0, 1, 1, 2, 2, 2, 2, 3]
    base = torch.randn(len(labels), 5, generator=generator, dtype=torch.float64)
    margin = 0.3 if distance == "cosine" else 1.0

    x_fast = base.clone().requires_grad_(True)
    fast = TripletMarginLoss(margin=margin, distance=distance)(x_fast, torch.tensor(labels))
    fast.backward()

    x_slow = base.clone().requires_grad_(True)
    slow = brute_force_batch_hard(x_slow, labels, margin, distance)
    slow.backward()

    assert fast.item() > 0  # random points violate the margin: the comparison is not 0 == 0
    torch.testing.assert_close(fast, slow)
    torch.testing.assert_close(x_fast.grad, x_slow.grad)


def test_miner_picks_farthest_positive_and_nearest_negative() -> None:
    # Points on a line: class 0 at 0, 1, 5; class 1 at 2, 10.
    points = torch.tensor([[0.0], [1.0], [5.0], [2.0], [10.0]])
    labels = torch.tensor([0, 0, 0, 1, 1])
    triplets = BatchHardMiner()(euclidean_distance_matrix(points), labels)
    assert triplets.anchor.tolist() == [0, 1, 2, 3, 4]
    assert triplets.positive.tolist() == [2, 2, 0, 4, 3]
    assert triplets.negative.tolist() == [3, 3, 3, 1, 2]


def test_distance_matrices_match_pairwise_definitions() -> None:
    x = torch.randn(6, 4, dtype=torch.float64)
    torch.testing.assert_close(euclidean_distance_matrix(x), torch.cdist(x, x), atol=1e-6, rtol=0)
    cos = torch.nn.functional.cosine_similarity(x[:, None], x[None, :], dim=-1)
    torch.testing.assert_close(cosine_distance_matrix(x), 1 - cos)


def test_identical_embeddings_have_finite_gradients() -> None:
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]], requires_grad=True)
    loss = TripletMarginLoss(margin=0.5, distance="euclidean")(x, torch.tensor([0, 0, 1, 1]))
    loss.backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("labels", [[0, 0, 0, 0], [0, 1, 2, 3]], ids=["one-class", "singletons"])
def test_batch_without_valid_triplets_is_zero_with_a_gradient(labels: list[int]) -> None:
    x = torch.randn(4, 3, requires_grad=True)
    loss_fn = TripletMarginLoss()
    loss = loss_fn(x, torch.tensor(labels))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert x.grad is not None and torch.equal(x.grad, torch.zeros_like(x))
    assert loss_fn.last_num_triplets == 0


def test_unknown_distance_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown distance 'manhattan'"):
        TripletMarginLoss(distance="manhattan")  # type: ignore[arg-type]
