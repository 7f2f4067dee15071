"""Class-balanced P x K batches for metric learning.

Online triplet mining needs positives in every batch: a uniformly shuffled batch of 64 from thousands of
products has almost none. :class:`PKSampler` draws P distinct classes per batch and K items of each.

- Classes are visited in shuffled passes (every class once per pass before any repeats), so rare and
  frequent classes are seen equally often; items of a class are visited in shuffled passes too.
- A class with fewer than K items is sampled with replacement (its items repeat in the batch).
- Everything is a function of (seed, epoch): two runs, or a resumed run, see the same batches.
- Rows with a negative label (``visuray.catalog.readers.NO_LABEL``: unlabelled) are never sampled.
- With ``world_size`` ranks, one global stream of batches is dealt round-robin: rank r gets global
  batches r, r + world_size, ..., so ranks never share a batch and all have the same P x K shape.

Only integer labels are needed (no images), so building the batches for a catalog is cheap.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

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
        class_queue = _ShuffledCycle(np.arange(len(self._members)), rng)
        item_queues = [_ShuffledCycle(members, rng) for members in self._members]
        batches = []
        for _ in range(self.num_batches * self.world_size):
            batch: list[int] = []
            for c in class_queue.take_distinct(self.p):
                members = self._members[c]
                if len(members) >= self.k:
                    batch.extend(item_queues[c].take_distinct(self.k))
                else:
                    batch.extend(rng.choice(members, size=self.k, replace=True).tolist())
            batches.append(batch)
        return batches


class _ShuffledCycle:
    """Endless shuffled passes over ``items``; ``take_distinct(n)`` never returns an item twice."""

    def __init__(self, items: np.ndarray, rng: np.random.Generator) -> None:
        self.items = items
        self.rng = rng
        self.order: list[int] = []

    def take_distinct(self, n: int) -> list[int]:
        taken: list[int] = []
        while len(taken) < n:
            if not self.order:
                self.order = self.rng.permutation(self.items).tolist()
            # An item still queued from the previous pass may come again right after a reshuffle:
            # move past duplicates (there are at least n distinct items, so this ends).
            item = self.order.pop()
            if item in taken:
                self.order.insert(0, item)
                continue
            taken.append(item)
        return taken
