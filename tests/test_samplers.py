"""P x K batches: shape, class balance, replacement for small classes, determinism, rank splitting."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from visuray.metric_learning.samplers import CategoryBalancedSampler, PKSampler, _ShuffledCycle

pytestmark = pytest.mark.unit

# 6 classes: sizes 10, 8, 6, 5, 2 (fewer than K) and 1 (a singleton); plus two unlabelled rows (-1).
LABELS = [0] * 10 + [1] * 8 + [2] * 6 + [3] * 5 + [4] * 2 + [5] + [-1, -1]


def _label_counts(batch: list[int]) -> Counter:
    return Counter(LABELS[i] for i in batch)


def test_every_batch_has_p_distinct_classes_with_k_items_each() -> None:
    sampler = PKSampler(LABELS, p=3, k=4, num_batches=20, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 20
    for batch in batches:
        assert len(batch) == 12
        counts = _label_counts(batch)
        assert len(counts) == 3 and set(counts.values()) == {4}
        assert -1 not in counts  # unlabelled rows are never sampled


def test_large_classes_are_sampled_without_and_small_ones_with_replacement() -> None:
    sampler = PKSampler(LABELS, p=3, k=4, num_batches=40, seed=2)
    small_repeats = 0
    for batch in sampler:
        for label, count in _label_counts(batch).items():
            items = [i for i in batch if LABELS[i] == label]
            if label in (4, 5):
                small_repeats += 1
                assert len(set(items)) <= {4: 2, 5: 1}[label]  # only its own items, repeated
            else:
                assert len(set(items)) == count  # no duplicates within a class of >= K items
    assert small_repeats > 0


def test_classes_are_visited_evenly() -> None:
    sampler = PKSampler(LABELS, p=2, k=2, num_batches=30, seed=3)
    visits = Counter(label for batch in sampler for label in set(LABELS[i] for i in batch))
    # 60 class slots over 6 classes in shuffled passes: each class 10 times (passes may straddle batches).
    assert set(visits) == {0, 1, 2, 3, 4, 5}
    assert max(visits.values()) - min(visits.values()) <= 2


def test_items_of_a_class_are_all_used_before_any_repeats() -> None:
    labels = [0] * 8 + [1] * 8
    sampler = PKSampler(labels, p=2, k=4, num_batches=2, seed=0)
    used = [i for batch in sampler for i in batch]
    assert sorted(used) == list(range(16))


def test_deterministic_given_seed_and_epoch() -> None:
    a = PKSampler(LABELS, p=3, k=2, num_batches=5, seed=7)
    b = PKSampler(LABELS, p=3, k=2, num_batches=5, seed=7)
    assert list(a) == list(b)
    b.set_epoch(1)
    epoch1 = list(b)
    assert epoch1 != list(a)
    a.set_epoch(1)
    assert list(a) == epoch1
    assert list(PKSampler(LABELS, p=3, k=2, num_batches=5, seed=8)) != list(
        PKSampler(LABELS, p=3, k=2, num_batches=5, seed=7)
    )


def test_start_batch_skips_into_the_epoch() -> None:
    sampler = PKSampler(LABELS, p=2, k=2, num_batches=6, seed=4)
    full = list(sampler)
    sampler.set_epoch(0, start_batch=4)
    assert len(sampler) == 2
    assert list(sampler) == full[4:]


def test_ranks_get_disjoint_batches_of_one_global_stream() -> None:
    world = 3
    ranks = [
        PKSampler(LABELS, p=3, k=2, num_batches=4, seed=5, rank=r, world_size=world) for r in range(world)
    ]
    per_rank = [list(s) for s in ranks]
    assert all(len(batches) == 4 for batches in per_rank)
    assert all(len(batch) == 6 for batches in per_rank for batch in batches)
    # Dealt round-robin from one stream: no batch is given to two ranks.
    global_stream = ranks[0].global_batches(0)
    assert len(global_stream) == 12
    for r in range(world):
        assert per_rank[r] == global_stream[r::world]
    as_tuples = [tuple(b) for batches in per_rank for b in batches]
    assert len(set(as_tuples)) == len(as_tuples)


def test_resuming_at_the_end_of_an_epoch_and_the_next_epoch_from_its_start() -> None:
    sampler = PKSampler(LABELS, p=2, k=2, num_batches=6, seed=4)
    sampler.set_epoch(0, start_batch=6)  # saved after the epoch's last batch
    assert len(sampler) == 0 and list(sampler) == []
    sampler.set_epoch(1)  # the next epoch starts at its first batch again
    assert len(sampler) == 6 and list(sampler) == sampler.global_batches(1)


def test_classes_of_exactly_k_items_take_each_item_once() -> None:
    labels = [0] * 5 + [1] * 5 + [2] * 5
    # No repeats: a class of exactly K items is not drawn with replacement.
    for batch in PKSampler(labels, p=3, k=5, num_batches=10, seed=0):
        assert sorted(batch) == list(range(15))


def test_shuffled_cycle_queues_at_most_two_passes() -> None:
    # Taking one item at a time must not queue a fresh pass per call: the queue (and the time to extend
    # it) would grow with the number of batches of an epoch.
    cycle = _ShuffledCycle(np.arange(50), np.random.default_rng(0))
    taken = [item for _ in range(500) for item in cycle.take_distinct(1)]
    assert len(cycle.order) <= 2 * 50
    for start in range(0, 500, 50):  # whole passes: every item once per 50 takes
        assert sorted(taken[start : start + 50]) == list(range(50))


def test_default_length_covers_the_labelled_rows_once_per_epoch() -> None:
    assert len(PKSampler(LABELS, p=2, k=2)) == 32 // 4
    assert len(PKSampler(LABELS, p=2, k=2, world_size=2)) == 32 // 8
    assert len(PKSampler(LABELS, p=4, k=10)) == 1  # fewer rows than one batch: still one batch
    assert list(PKSampler(LABELS, p=2, k=2, num_batches=3)) == list(
        PKSampler(LABELS, p=2, k=2, num_batches=3, seed=0)
    )  # the default seed is 0


def test_one_class_or_one_item_per_batch_is_allowed() -> None:
    for batch in PKSampler(LABELS, p=1, k=3, num_batches=5):
        assert len(_label_counts(batch)) == 1 and len(batch) == 3
    for batch in PKSampler(LABELS, p=3, k=1, num_batches=5):
        assert len(_label_counts(batch)) == 3 and len(batch) == 3


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="only 6 labelled classes"):
        PKSampler(LABELS, p=7, k=2)
    with pytest.raises(ValueError, match="rank 2 is not in"):
        PKSampler(LABELS, p=2, k=2, rank=2, world_size=2)
    with pytest.raises(ValueError, match="at least 1"):
        PKSampler(np.array(LABELS), p=0, k=2)


# ---------------- category-favouring batches ----------------

# 8 classes of 6 items in 3 categories: {0, 1, 2, 3} shoes, {4, 5, 6} shirts, {7} a lone hat class.
CAT_LABELS = np.repeat(np.arange(8), 6)
CLASS_CATEGORY = np.array([0, 0, 0, 0, 1, 1, 1, 2])
CAT_OF_ROW = CLASS_CATEGORY[CAT_LABELS]


def _categories_of(batch: list[int]) -> set[int]:
    return {int(CAT_OF_ROW[i]) for i in batch}


@pytest.mark.parametrize("prob", [0.0, 0.5, 1.0])
def test_single_category_batches_come_with_the_given_probability(prob: float) -> None:
    sampler = CategoryBalancedSampler(
        CAT_LABELS, CAT_OF_ROW, p=3, k=2, single_category_prob=prob, num_batches=400
    )
    batches = list(sampler)
    assert sampler.num_categories == 2  # the one-class category cannot host a batch
    single = 0
    for batch in batches:
        counts = Counter(int(CAT_LABELS[i]) for i in batch)
        assert len(counts) == 3 and set(counts.values()) == {2}  # the P x K shape always holds
        single += len(_categories_of(batch)) == 1
    # A uniform batch of 3 of the 8 classes is single-category by chance with probability 5/56.
    chance = 5 / 56
    expected = prob + (1 - prob) * chance
    assert abs(single / len(batches) - expected) < 0.07


def test_small_category_is_completed_from_other_classes() -> None:
    # P = 4 but the shirts category has 3 classes: its batches take all 3 plus one other class.
    sampler = CategoryBalancedSampler(
        CAT_LABELS, CAT_OF_ROW, p=4, k=2, single_category_prob=1.0, num_batches=60
    )
    shirt_batches = 0
    for batch in sampler:
        classes = {int(CAT_LABELS[i]) for i in batch}
        assert len(classes) == 4
        if {4, 5, 6} <= classes:
            shirt_batches += 1
        else:
            assert classes == {0, 1, 2, 3}
    assert 15 <= shirt_batches <= 45


def test_category_sampler_is_deterministic_and_splits_ranks() -> None:
    def make(rank: int, world: int = 2) -> CategoryBalancedSampler:
        return CategoryBalancedSampler(
            CAT_LABELS, CAT_OF_ROW, p=3, k=2, single_category_prob=0.7, num_batches=5, seed=3, rank=rank,
            world_size=world,
        )  # fmt: skip

    assert list(make(0)) == list(make(0))
    stream = make(0).global_batches(0)
    assert list(make(0)) == stream[0::2] and list(make(1)) == stream[1::2]
    assert all(len(b) == 6 for b in stream)


def test_category_sampler_defaults_and_seed() -> None:
    def batches(**kwargs: int) -> list[list[int]]:
        return list(CategoryBalancedSampler(CAT_LABELS, CAT_OF_ROW, p=3, k=2, num_batches=8, **kwargs))

    explicit = list(
        CategoryBalancedSampler(
            CAT_LABELS, CAT_OF_ROW, p=3, k=2, single_category_prob=0.5, num_batches=8, seed=0, rank=0,
            world_size=1,
        )
    )  # fmt: skip
    assert batches() == explicit
    assert batches(seed=1) != explicit and batches(seed=1) == batches(seed=1)


def test_category_of_a_class_and_usable_categories() -> None:
    # Classes 0-1: category 0 (two classes, the fewest that can host a batch); classes 2-3: no category
    # (-1), which never groups them; class 4: mostly category 1 (one stray row of category 0).
    labels = np.repeat(np.arange(5), 4)
    categories = np.array([0] * 8 + [-1] * 8 + [1, 1, 1, 0])
    sampler = CategoryBalancedSampler(labels, categories, p=2, k=2, single_category_prob=1.0, num_batches=20)
    assert sampler.num_categories == 1
    for batch in sampler:
        assert {int(labels[i]) for i in batch} == {0, 1}


def test_category_sampler_without_usable_categories_is_plain_pk_at_probability_zero() -> None:
    sampler = CategoryBalancedSampler(
        CAT_LABELS, np.arange(len(CAT_LABELS)) // 6, p=3, k=2, single_category_prob=0.0, num_batches=10
    )
    assert sampler.num_categories == 0
    for batch in sampler:
        counts = Counter(int(CAT_LABELS[i]) for i in batch)
        assert len(counts) == 3 and set(counts.values()) == {2}
    with pytest.raises(ValueError, match=r"^40 labels but 48 categories$"):
        CategoryBalancedSampler(CAT_LABELS[:40], CAT_OF_ROW, p=2, k=2)


def test_category_sampler_without_usable_categories_is_an_error() -> None:
    with pytest.raises(
        ValueError, match="^no category holds two or more classes: single-category batches are impossible$"
    ):
        CategoryBalancedSampler(
            CAT_LABELS, np.arange(len(CAT_LABELS)) // 6, p=2, k=2, single_category_prob=0.5
        )
    with pytest.raises(ValueError, match="single_category_prob"):
        CategoryBalancedSampler(CAT_LABELS, CAT_OF_ROW, p=2, k=2, single_category_prob=1.5)
