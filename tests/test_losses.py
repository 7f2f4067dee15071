"""Every vectorised loss and miner against a brute-force loop over explicitly listed triplets or pairs."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from visuray.metric_learning.losses import (
    AdaptiveTripletLoss,
    BatchAllMiner,
    BatchHardMiner,
    ContrastiveLoss,
    MultiSimilarityLoss,
    SemiHardMiner,
    TripletMarginLoss,
    build_miner,
    cosine_distance_matrix,
    euclidean_distance_matrix,
)

pytestmark = pytest.mark.unit

# Unbalanced batch with a singleton class (label 3: an anchor with no positive gives no triplet).
LABELS = [0, 0, 0, 1, 1, 2, 2, 2, 2, 3]


def _pair_distance(a: torch.Tensor, b: torch.Tensor, distance: str) -> torch.Tensor:
    if distance == "cosine":
        return 1.0 - torch.dot(a, b) / (a.norm() * b.norm())
    return (a - b).norm()


def _all_triplets(labels: list[int]) -> list[tuple[int, int, int]]:
    n = len(labels)
    return [
        (a, p, q)
        for a, p, q in itertools.product(range(n), repeat=3)
        if p != a and labels[p] == labels[a] and labels[q] != labels[a]
    ]


def _hinge(x: torch.Tensor, a: int, p: int, q: int, margin: float, distance: str) -> torch.Tensor:
    return torch.relu(_pair_distance(x[a], x[p], distance) - _pair_distance(x[a], x[q], distance) + margin)


def brute_force_batch_hard(x: torch.Tensor, labels: list[int], margin: float, distance: str) -> torch.Tensor:
    """For every anchor, all (positive, negative) pairs; the largest hinge; averaged over anchors."""
    per_anchor = []
    for a in range(len(labels)):
        hinges = [_hinge(x, a, p, q, margin, distance) for (a2, p, q) in _all_triplets(labels) if a2 == a]
        if hinges:
            per_anchor.append(torch.stack(hinges).max())
    return torch.stack(per_anchor).mean()


def brute_force_batch_all(
    x: torch.Tensor, labels: list[int], margin_of, distance: str, active_only: bool
) -> torch.Tensor:
    hinges = torch.stack([_hinge(x, a, p, q, margin_of(a, q), distance) for a, p, q in _all_triplets(labels)])
    if active_only:
        return hinges[hinges.detach() > 0].mean()
    return hinges.mean()


def brute_force_semi_hard(x: torch.Tensor, labels: list[int], margin: float, distance: str) -> torch.Tensor:
    """Per (anchor, positive): the nearest negative farther than the positive; pairs without one skipped."""
    hinges = []
    n = len(labels)
    for a, p in itertools.product(range(n), repeat=2):
        if a == p or labels[a] != labels[p]:
            continue
        d_ap = _pair_distance(x[a], x[p], distance).item()
        farther = [
            (_pair_distance(x[a], x[q], distance).item(), q)
            for q in range(n)
            if labels[q] != labels[a] and _pair_distance(x[a], x[q], distance).item() > d_ap
        ]
        if farther:
            q = min(farther)[1]
            hinges.append(_hinge(x, a, p, q, margin, distance))
    return torch.stack(hinges).mean()


def _compare(fast_fn, slow_fn, seed: int, dim: int = 5) -> None:
    """Value and gradient of ``fast_fn(x, labels)`` and ``slow_fn(x)`` on the same random points."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(len(LABELS), dim, generator=generator, dtype=torch.float64)
    x_fast = base.clone().requires_grad_(True)
    fast = fast_fn(x_fast, torch.tensor(LABELS))
    fast.backward()
    x_slow = base.clone().requires_grad_(True)
    slow = slow_fn(x_slow)
    slow.backward()
    assert fast.item() > 0  # the comparison is not 0 == 0
    torch.testing.assert_close(fast, slow)
    torch.testing.assert_close(x_fast.grad, x_slow.grad)


MARGINS = {"cosine": 0.3, "euclidean": 1.0}


@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
@pytest.mark.parametrize("seed", [0, 1])
def test_batch_hard_matches_brute_force(distance: str, seed: int) -> None:
    margin = MARGINS[distance]
    _compare(
        TripletMarginLoss(margin=margin, distance=distance, miner=BatchHardMiner()),
        lambda x: brute_force_batch_hard(x, LABELS, margin, distance),
        seed,
    )


@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
@pytest.mark.parametrize("reduction", ["mean", "active"])
def test_batch_all_matches_brute_force(distance: str, reduction: str) -> None:
    margin = MARGINS[distance]
    _compare(
        TripletMarginLoss(margin=margin, distance=distance, miner=BatchAllMiner(), reduction=reduction),
        lambda x: brute_force_batch_all(x, LABELS, lambda a, q: margin, distance, reduction == "active"),
        seed=2,
    )


@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
@pytest.mark.parametrize("seed", [0, 3])
def test_semi_hard_matches_brute_force(distance: str, seed: int) -> None:
    margin = MARGINS[distance]
    _compare(
        TripletMarginLoss(margin=margin, distance=distance, miner=SemiHardMiner()),
        lambda x: brute_force_semi_hard(x, LABELS, margin, distance),
        seed,
    )


def _as_tuples(triplets) -> list[tuple[int, int, int]]:
    return list(
        zip(triplets.anchor.tolist(), triplets.positive.tolist(), triplets.negative.tolist(), strict=True)
    )


def test_batch_all_mines_every_valid_triplet() -> None:
    x = torch.randn(len(LABELS), 3)
    triplets = BatchAllMiner()(cosine_distance_matrix(x), torch.tensor(LABELS))
    mined = sorted(_as_tuples(triplets))
    assert mined == sorted(_all_triplets(LABELS))


def test_miners_pick_the_documented_negatives() -> None:
    # Points on a line: class 0 at 0, 1, 5; class 1 at 2, 10.
    points = torch.tensor([[0.0], [1.0], [5.0], [2.0], [10.0]])
    labels = torch.tensor([0, 0, 0, 1, 1])
    distances = euclidean_distance_matrix(points)
    hard = BatchHardMiner()(distances, labels)
    assert hard.anchor.tolist() == [0, 1, 2, 3, 4]
    assert hard.positive.tolist() == [2, 2, 0, 4, 3]
    assert hard.negative.tolist() == [3, 3, 3, 1, 2]
    semi = SemiHardMiner()(distances, labels)
    got = set(_as_tuples(semi))
    # (0, 1): d_ap = 1, negatives at 2 and 10 -> 3 (d=2). (0, 2): d_ap = 5, only 4 (d=10) is farther.
    # (2, 0): d_ap = 5, negatives at 3 (d=3) and 4 (d=5, not farther): skipped.
    assert (0, 1, 3) in got and (0, 2, 4) in got
    assert not any(a == 2 and p == 0 for a, p, _ in got)


def test_adaptive_margin_matches_brute_force() -> None:
    rng = np.random.default_rng(0)
    semantic = rng.uniform(0, 1, size=(4, 4))
    semantic = (semantic + semantic.T) / 2
    np.fill_diagonal(semantic, 0)
    margin, scale = 0.1, 0.4

    def margin_of(a: int, q: int) -> float:
        return margin + scale * float(np.float32(semantic[LABELS[a], LABELS[q]]))

    _compare(
        AdaptiveTripletLoss(semantic, margin, scale, distance="cosine", miner=BatchAllMiner()),
        lambda x: brute_force_batch_all(x, LABELS, margin_of, "cosine", active_only=False),
        seed=4,
    )


@pytest.mark.parametrize(
    ("distance", "reduction"), [("cosine", "mean"), ("euclidean", "mean"), ("cosine", "active")]
)
def test_adaptive_defaults_distance_and_reduction_reach_the_loss(distance: str, reduction: str) -> None:
    rng = np.random.default_rng(1)
    semantic = rng.uniform(0, 1, size=(4, 4))
    margin = MARGINS[distance] / 2

    def margin_of(a: int, q: int) -> float:
        return margin + 0.2 * float(np.float32(semantic[LABELS[a], LABELS[q]]))  # default scale 0.2

    _compare(
        AdaptiveTripletLoss(semantic, margin, distance=distance, miner=BatchAllMiner(), reduction=reduction),
        lambda x: brute_force_batch_all(x, LABELS, margin_of, distance, reduction == "active"),
        seed=8,
    )
    default = AdaptiveTripletLoss(np.zeros((4, 4)))  # margin 0.1 with batch-hard mining on cosine
    _compare(default, lambda x: brute_force_batch_hard(x, LABELS, 0.1, "cosine"), seed=9)


def test_adaptive_table_checks_dtype_and_state() -> None:
    with pytest.raises(ValueError, match=r"semantic_distances must be square, got shape \(3, 4\)"):
        AdaptiveTripletLoss(np.zeros((3, 4)))
    with pytest.raises(ValueError, match=r"margin_scale must be non-negative \(got -0.1\)"):
        AdaptiveTripletLoss(np.zeros((4, 4)), margin_scale=-0.1)
    loss_fn = AdaptiveTripletLoss(np.full((4, 4), 0.5), margin_scale=0.0)  # zero scale: a fixed margin
    # A float64 table must not turn a float32 batch's loss into float64.
    assert loss_fn(torch.randn(len(LABELS), 3), torch.tensor(LABELS)).dtype == torch.float32
    # The table comes from the catalog on every run: it is not part of a checkpoint.
    assert "semantic_distances" not in loss_fn.state_dict()
    # Labels must index the table's rows: label 4 is one past a 4-class table.
    with pytest.raises(ValueError, match="index the 4 fine classes"):
        loss_fn(torch.randn(5, 3), torch.tensor([0, 0, 4, 4, 1]))
    with pytest.raises(ValueError, match="index the 4 fine classes"):
        loss_fn(torch.randn(4, 3), torch.tensor([0, 0, -1, -1]))


def test_adaptive_margin_is_the_fixed_one_without_semantic_distance() -> None:
    x = torch.randn(len(LABELS), 6, dtype=torch.float64)
    labels = torch.tensor(LABELS)
    adaptive = AdaptiveTripletLoss(np.zeros((4, 4)), margin=0.25, margin_scale=1.0)(x, labels)
    fixed = TripletMarginLoss(margin=0.25)(x, labels)
    torch.testing.assert_close(adaptive, fixed)
    with pytest.raises(ValueError, match="index the 2 fine classes"):
        AdaptiveTripletLoss(np.zeros((2, 2)))(x, labels)


def brute_force_multi_similarity(x: torch.Tensor, labels: list[int], alpha: float, beta: float, base: float):
    unit = x / x.norm(dim=1, keepdim=True)
    per_anchor = []
    for i in range(len(labels)):
        pos = [torch.exp(-alpha * (unit[i] @ unit[j] - base)) for j in range(len(labels))
               if j != i and labels[j] == labels[i]]  # fmt: skip
        neg = [
            torch.exp(beta * (unit[i] @ unit[j] - base)) for j in range(len(labels)) if labels[j] != labels[i]
        ]
        pos_term = torch.log(1 + torch.stack(pos).sum()) / alpha if pos else x.new_zeros(())
        neg_term = torch.log(1 + torch.stack(neg).sum()) / beta if neg else x.new_zeros(())
        per_anchor.append(pos_term + neg_term)
    return torch.stack(per_anchor).mean()


@pytest.mark.parametrize(
    ("seed", "alpha", "beta", "base"),
    # beta below the default keeps exp() away from overflow here; the second set differs from the
    # library's own defaults in every value, so each one must be passed through.
    [(0, 2.0, 10.0, 0.5), (1, 2.0, 10.0, 0.5), (2, 3.0, 8.0, 0.3)],
)
def test_multi_similarity_matches_brute_force(seed: int, alpha: float, beta: float, base: float) -> None:
    _compare(
        MultiSimilarityLoss(alpha, beta, base),
        lambda x: brute_force_multi_similarity(x, LABELS, alpha, beta, base),
        seed,
    )


def test_pair_loss_defaults_match_brute_force_with_the_documented_values() -> None:
    # MultiSimilarityLoss: the paper's alpha=2, beta=50, base=0.5 (float64 keeps exp(50 s) finite);
    # ContrastiveLoss: pos_margin=0, neg_margin=0.5 on cosine distance.
    _compare(
        MultiSimilarityLoss(),
        lambda x: brute_force_multi_similarity(x, LABELS, 2.0, 50.0, 0.5),
        seed=6,
    )
    _compare(ContrastiveLoss(), lambda x: brute_force_contrastive(x, LABELS, 0.0, 0.5, "cosine"), seed=7)


def brute_force_contrastive(
    x: torch.Tensor, labels: list[int], pos_margin: float, neg_margin: float, distance
):
    """Mean of the non-zero positive-pair losses plus mean of the non-zero negative-pair losses."""
    pos, neg = [], []
    for i, j in itertools.permutations(range(len(labels)), 2):
        d = _pair_distance(x[i], x[j], distance)
        if labels[i] == labels[j]:
            pos.append(torch.relu(d - pos_margin))
        else:
            neg.append(torch.relu(neg_margin - d))

    def mean_nonzero(values: list[torch.Tensor]) -> torch.Tensor:
        stacked = torch.stack(values)
        nonzero = stacked[stacked.detach() > 0]
        return nonzero.mean() if len(nonzero) else stacked.sum() * 0

    return mean_nonzero(pos) + mean_nonzero(neg)


@pytest.mark.parametrize(
    ("distance", "pos_margin", "neg_margin"), [("cosine", 0.2, 1.0), ("euclidean", 1.0, 2.5)]
)
def test_contrastive_matches_brute_force(distance: str, pos_margin: float, neg_margin: float) -> None:
    _compare(
        ContrastiveLoss(pos_margin, neg_margin, distance=distance),
        lambda x: brute_force_contrastive(x, LABELS, pos_margin, neg_margin, distance),
        seed=5,
    )


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


TRIPLET_LOSSES = {
    "batch_hard": lambda: TripletMarginLoss(miner=BatchHardMiner()),
    "batch_all": lambda: TripletMarginLoss(miner=BatchAllMiner(), reduction="active"),
    "semi_hard": lambda: TripletMarginLoss(miner=SemiHardMiner()),
    "adaptive": lambda: AdaptiveTripletLoss(np.zeros((4, 4))),
}
PAIR_LOSSES = {"multi_similarity": MultiSimilarityLoss, "contrastive": ContrastiveLoss}


def _assert_zero_with_gradient(loss_fn, x: torch.Tensor, labels: list[int]) -> None:
    loss = loss_fn(x, torch.tensor(labels))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert x.grad is not None and torch.equal(x.grad, torch.zeros_like(x))
    assert loss_fn.last_num_tuples == 0


@pytest.mark.parametrize("name", sorted(TRIPLET_LOSSES))
@pytest.mark.parametrize("labels", [[0, 0, 0, 0], [0, 1, 2, 3]], ids=["one-class", "singletons"])
def test_triplet_batch_without_triplets_is_zero_with_a_gradient(name: str, labels: list[int]) -> None:
    _assert_zero_with_gradient(TRIPLET_LOSSES[name](), torch.randn(4, 3, requires_grad=True), labels)


@pytest.mark.parametrize("name", sorted(PAIR_LOSSES))
def test_pair_loss_batch_without_pairs_is_zero_with_a_gradient(name: str) -> None:
    _assert_zero_with_gradient(PAIR_LOSSES[name](), torch.randn(1, 3, requires_grad=True), [0])


@pytest.mark.parametrize("name", sorted(PAIR_LOSSES))
def test_pair_losses_learn_from_one_class_batches(name: str) -> None:
    # Unlike triplets, pairs need no negative: a one-class batch still pulls its members together.
    x = torch.randn(4, 3, requires_grad=True)
    PAIR_LOSSES[name]()(x, torch.zeros(4, dtype=torch.long)).backward()
    assert x.grad.abs().sum() > 0


@pytest.mark.parametrize("name", sorted(PAIR_LOSSES))
def test_pair_losses_count_pairs_and_agree_without_gradient(name: str) -> None:
    loss_fn = PAIR_LOSSES[name]()
    assert loss_fn.last_num_tuples == 0  # nothing seen yet
    x = torch.randn(len(LABELS), 5, dtype=torch.float64)
    with_grad = loss_fn(x.clone().requires_grad_(True), torch.tensor(LABELS))
    n = len(LABELS)
    assert loss_fn.last_num_tuples == n * (n - 1)  # every ordered pair is a positive or a negative one
    with torch.no_grad():  # e.g. a validation loss: the same value, not a sign-flipped one
        without = loss_fn(x, torch.tensor(LABELS))
    assert with_grad.item() > 0
    torch.testing.assert_close(without, with_grad.detach())


def test_multi_similarity_is_finite_at_the_default_beta() -> None:
    x = torch.nn.functional.normalize(torch.randn(16, 8), dim=1).requires_grad_(True)
    loss = MultiSimilarityLoss()(x, torch.arange(16) // 4)
    loss.backward()
    assert math.isfinite(loss.item()) and torch.isfinite(x.grad).all()


def test_triplet_default_margin_and_logged_fractions() -> None:
    loss_fn = TripletMarginLoss()  # margin 0.2, cosine, batch-hard
    assert loss_fn.last_num_tuples == 0 and loss_fn.last_active_fraction == 0.0  # nothing seen yet
    _compare(loss_fn, lambda x: brute_force_batch_hard(x, LABELS, 0.2, "cosine"), seed=10)
    x = torch.randn(len(LABELS), 4, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    batch_all = TripletMarginLoss(margin=0.3, miner=BatchAllMiner())
    batch_all(x, torch.tensor(LABELS))
    hinges = [_hinge(x, a, p, q, 0.3, "cosine").item() for a, p, q in _all_triplets(LABELS)]
    assert batch_all.last_num_tuples == len(hinges)
    assert batch_all.last_active_fraction == pytest.approx(np.mean([h > 0 for h in hinges]))
    assert 0 < batch_all.last_active_fraction < 1
    batch_all(x[:4], torch.zeros(4, dtype=torch.long))  # one class: no triplet, nothing active
    assert batch_all.last_num_tuples == 0 and batch_all.last_active_fraction == 0.0


def test_active_reduction_with_every_triplet_satisfied_is_zero_with_a_gradient() -> None:
    # Two tight, far-apart clusters: every triplet meets the margin, so none is active.
    x = torch.tensor([[1.0, 0.0], [1.0, 0.01], [-1.0, 0.0], [-1.0, 0.01]], requires_grad=True)
    loss_fn = TripletMarginLoss(margin=0.1, miner=BatchAllMiner(), reduction="active")
    loss = loss_fn(x, torch.tensor([0, 0, 1, 1]))
    assert loss.item() == 0.0 and loss.requires_grad and loss_fn.last_num_tuples == 8
    loss.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_unknown_names_are_errors() -> None:
    with pytest.raises(ValueError, match="unknown distance 'manhattan'"):
        TripletMarginLoss(distance="manhattan")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown miner 'hardest'"):
        build_miner("hardest")
    with pytest.raises(ValueError, match=r"^unknown reduction 'sum'; use 'mean' or 'active'$"):
        TripletMarginLoss(reduction="sum")  # type: ignore[arg-type]
