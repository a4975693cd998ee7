"""The caption pool: the per-slot shuffle of the training reader.

Decoded images enter a pool; each batch takes one caption from each of `batch_size` distinct
images drawn at random from it, so two captions of one image share a batch only in a slot's last
batches (data_shards/reader.py's docstring gives the numbers against a plain shuffle buffer).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(slots=True)
class PooledImage:
    """An image in a slot's caption pool: what its batches need, its features being in `row` of
    the slot's `RowPool`."""

    key: str
    captions: list[str]
    index: int
    boxes: np.ndarray | None
    row: int


class CaptionPool:
    """The per-slot shuffle: a pool of images; each batch takes one caption from each of
    `batch_size` distinct images drawn at random (see the module docstring). `on_leave` is told
    of each image whose last caption a batch has just taken."""

    def __init__(self, capacity: int, batch_size: int, rng: np.random.Generator,
                 on_leave: Callable[[PooledImage], None] | None = None) -> None:
        self.capacity = capacity
        self.batch_size = batch_size
        self.rng = rng
        self.on_leave = on_leave
        self.entries: list[tuple[PooledImage, list[int]]] = []  # (image, its captions not yet used)

    def _take(self, picks: Sequence[int]) -> list[tuple[PooledImage, int]]:
        pairs = [(self.entries[i][0], self.entries[i][1].pop()) for i in picks]
        kept = []
        for entry in self.entries:
            if entry[1]:
                kept.append(entry)
            elif self.on_leave is not None:
                self.on_leave(entry[0])
        self.entries = kept
        return pairs

    def batches(self, images: Iterator[PooledImage]) -> Iterator[list[tuple[PooledImage, int]]]:
        """Full batches from the pool and `images`; at the end of `images`, leftovers of less
        than a batch stay in the pool (for a top-up pass, or dropped)."""
        exhausted = False
        while True:
            while not exhausted and len(self.entries) < self.capacity:
                image = next(images, None)
                if image is None:
                    exhausted = True
                else:
                    self.entries.append((image, self.rng.permutation(len(image.captions)).tolist()))
            if len(self.entries) >= self.batch_size:
                yield self._take(self.rng.choice(len(self.entries), size=self.batch_size, replace=False).tolist())
            elif sum(len(left) for _, left in self.entries) >= self.batch_size:
                # The slot's last batches: fewer images than a batch, so some repeat (masked by id).
                pairs: list[tuple[PooledImage, int]] = []
                while len(pairs) < self.batch_size:
                    picks = self.rng.permutation(len(self.entries))[: self.batch_size - len(pairs)]
                    pairs.extend(self._take(picks.tolist()))
                yield pairs
            else:
                return
