"""Class-balanced P x K batches for metric learning, optionally favouring one product category per batch.

Online triplet mining needs positives in every batch: a uniformly shuffled batch of 64 from thousands of
products has almost none. :class:`PKSampler` draws P distinct classes per batch and K items of each.

- Classes are visited in shuffled passes (every class once per pass before any repeats), so rare and
  frequent classes are seen equally often; items of a class are visited in shuffled passes too.
- A class with fewer than K items is sampled with replacement (its items repeat in the batch).
- Everything is a function of (seed, epoch): two runs, or a resumed run, see the same batches.
- Rows with a negative label (``visuray.catalog.readers.NO_LABEL``: unlabelled) are never sampled.
- With ``world_size`` ranks, one global stream of batches is dealt round-robin: rank r gets global
  batches r, r + world_size, ..., so ranks never share a batch and all have the same P x K shape.

- :class:`CategoryBalancedSampler`: with probability ``single_category_prob`` a batch's P classes all
  come from one product category (e.g. P kinds of shoes), so every negative is a hard one from the same
  category; otherwise the batch is drawn as above.

Only integer labels are needed (no images), so building the batches for a catalog is cheap.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np


class PKSampler:
    """A batch sampler (``DataLoader(batch_sampler=...)``) yielding lists of P*K dataset indices."""

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray,
        p: int,
        k: int,
        num_batches: int | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        """``num_batches`` per rank and epoch; by default one epoch covers the dataset about once."""
        if p < 1 or k < 1:
            raise ValueError(f"P and K must be at least 1 (got P={p}, K={k})")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        labels = np.asarray(labels)
        labelled = np.flatnonzero(labels >= 0)
        classes, inverse = np.unique(labels[labelled], return_inverse=True)
        if len(classes) < p:
            raise ValueError(
                f"P={p} classes per batch but the dataset has only {len(classes)} labelled classes"
            )
        self._members = [labelled[inverse == c] for c in range(len(classes))]
        self.p, self.k = p, k
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.num_batches = num_batches or max(1, len(labelled) // (p * k * world_size))
        self.epoch = 0
        self.start_batch = 0

    @property
    def num_classes(self) -> int:
        """Labelled classes the batches are drawn from."""
        return len(self._members)

    @property
    def batch_size(self) -> int:
        return self.p * self.k

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Choose the epoch's batches; ``start_batch`` skips the first batches (resuming mid-epoch)."""
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return max(0, self.num_batches - self.start_batch)

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.global_batches(self.epoch)
        for i in range(self.start_batch, self.num_batches):
            yield batches[i * self.world_size + self.rank]

    def global_batches(self, epoch: int) -> list[list[int]]:
        """All ranks' batches of ``epoch`` in global order (rank r owns indices r, r + world_size, ...)."""
        rng = np.random.default_rng([self.seed, epoch])
        pick_classes = self._class_picker(rng)
        item_queues = [_ShuffledCycle(members, rng) for members in self._members]
        batches = []
        for _ in range(self.num_batches * self.world_size):
            batch: list[int] = []
            for c in pick_classes():
                members = self._members[c]
                if len(members) >= self.k:
                    batch.extend(item_queues[c].take_distinct(self.k))
                else:
                    batch.extend(rng.choice(members, size=self.k, replace=True).tolist())
            batches.append(batch)
        return batches

    def _class_picker(self, rng: np.random.Generator) -> Callable[[], list[int]]:
        """A function giving the P distinct classes (indices into ``_members``) of the next batch."""
        class_queue = _ShuffledCycle(np.arange(len(self._members)), rng)
        return lambda: class_queue.take_distinct(self.p)


class CategoryBalancedSampler(PKSampler):
    """P x K batches of which a share ``single_category_prob`` draws all P classes from one category.

    ``categories`` gives each row's product category (negative: none). A class belongs to the category
    most of its rows have. Only categories with at least two classes can host a single-category batch
    (one class gives no negatives); when such a category has fewer than P classes, the batch takes all
    of them and fills the remaining slots from the other classes. Categories are visited in shuffled
    passes, as classes are, and so are the classes within a category.
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray,
        categories: Sequence[int] | np.ndarray,
        p: int,
        k: int,
        single_category_prob: float = 0.5,
        num_batches: int | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__(labels, p, k, num_batches=num_batches, seed=seed, rank=rank, world_size=world_size)
        if not 0.0 <= single_category_prob <= 1.0:
            raise ValueError(f"single_category_prob must be in [0, 1] (got {single_category_prob})")
        categories = np.asarray(categories)
        if len(categories) != len(labels):
            raise ValueError(f"{len(labels)} labels but {len(categories)} categories")
        class_category = np.array(
            [np.bincount(np.maximum(categories[m], 0) + (categories[m] >= 0), minlength=1).argmax() - 1
             for m in self._members]
        )  # fmt: skip
        groups = [np.flatnonzero(class_category == c) for c in np.unique(class_category[class_category >= 0])]
        self._category_classes = [g for g in groups if len(g) >= 2]
        if single_category_prob > 0 and not self._category_classes:
            raise ValueError("no category holds two or more classes: single-category batches are impossible")
        self.single_category_prob = single_category_prob

    @property
    def num_categories(self) -> int:
        """Categories that can host a single-category batch (two or more classes)."""
        return len(self._category_classes)

    def _class_picker(self, rng: np.random.Generator) -> Callable[[], list[int]]:
        class_queue = _ShuffledCycle(np.arange(len(self._members)), rng)
        if not self._category_classes:
            return lambda: class_queue.take_distinct(self.p)
        category_queue = _ShuffledCycle(np.arange(len(self._category_classes)), rng)
        within = [_ShuffledCycle(classes, rng) for classes in self._category_classes]

        def pick() -> list[int]:
            if rng.random() >= self.single_category_prob:
                return class_queue.take_distinct(self.p)
            (category,) = category_queue.take_distinct(1)
            queue = within[category]
            chosen = queue.take_distinct(min(self.p, len(queue.items)))
            return chosen + class_queue.take_distinct(self.p - len(chosen), exclude=set(chosen))

        return pick


class _ShuffledCycle:
    """Endless shuffled passes over ``items``; ``take_distinct(n)`` never returns an item twice."""

    def __init__(self, items: np.ndarray, rng: np.random.Generator) -> None:
        self.items = items
        self.rng = rng
        self.order: list[int] = []

    def take_distinct(self, n: int, exclude: set[int] | None = None) -> list[int]:
        """``n`` distinct items, none of them in ``exclude`` (at least ``n`` others must exist)."""
        taken: list[int] = []
        skip = set(exclude or ())
        while len(taken) < n:
            if not self.order:
                self.order = self.rng.permutation(self.items).tolist()
            elif all(i in taken or i in skip for i in self.order):
                # Only unusable items are left in this pass: start the next one under them.
                self.order = self.rng.permutation(self.items).tolist() + self.order
            # An item still queued from the previous pass may come again right after a reshuffle:
            # move past duplicates (there are at least n usable items, so this ends).
            item = self.order.pop()
            if item in taken or item in skip:
                self.order.insert(0, item)
                continue
            taken.append(item)
        return taken
