"""The training epoch plan: pure functions of (seed, epoch, world size, loader workers, the
manifest's sample counts), identical on every rank without communication (reader.py's docstring
tells the whole policy).

Every random generator of the training reader is seeded from here (`epoch_rng`), with a domain
tag per use so that the plan, the caption pools and the region orders draw independent streams.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# Domain tags keep the generators of the plan, the pools and the region orders independent.
PLAN_STREAM, POOL_STREAM, REGION_STREAM = 0, 1, 2


@dataclass(frozen=True)
class EpochPlan:
    """Which shards each (rank, slot) reads in an epoch, and how many batches it makes."""

    epoch: int
    world_size: int
    slots_per_rank: int
    batch_size: int
    shards: tuple[tuple[tuple[int, ...], ...], ...]  # [rank][slot] -> shard positions, in reading order
    pairs: tuple[tuple[int, ...], ...]  # [rank][slot] -> estimated (image, caption) pairs available
    batches: tuple[tuple[int, ...], ...]  # [rank][slot] -> batches to make

    @property
    def batches_per_rank(self) -> int:
        return sum(self.batches[0])

    @property
    def dropped_pairs(self) -> int:
        """Estimated pairs of the epoch that no batch carries (the remainder), over all ranks."""
        return sum(map(sum, self.pairs)) - self.batches_per_rank * self.world_size * self.batch_size

    def delivery_order(self, rank: int) -> list[int]:
        """The slot of each of the rank's batches, in the order the DataLoader delivers them:
        round-robin over the slots, skipping those that have made all their batches."""
        remaining = list(self.batches[rank])
        order: list[int] = []
        while any(remaining):
            for slot, left in enumerate(remaining):
                if left:
                    order.append(slot)
                    remaining[slot] -= 1
        return order

    def resume_point(self, rank: int, start_batch: int) -> tuple[tuple[int, ...], int]:
        """(batches each slot made among the first `start_batch`, the slot that makes batch
        `start_batch`: loader worker 0 plays that slot, so round-robin continues where it stopped)."""
        order = self.delivery_order(rank)
        if not 0 <= start_batch <= len(order):
            raise ValueError(f"start_batch {start_batch} is outside the epoch's {len(order)} batches")
        done = Counter(order[:start_batch])
        next_slot = order[start_batch] if start_batch < len(order) else 0
        return tuple(done.get(s, 0) for s in range(self.slots_per_rank)), next_slot


def make_plan(shard_samples: Sequence[int], *, images: int, captions: int, world_size: int,
              slots_per_rank: int, batch_size: int, seed: int, epoch: int) -> EpochPlan:
    """The epoch plan (see the module docstring): permute, balance by samples, count batches.

    `images`/`captions` are the manifest totals; their ratio estimates each slot's pairs.
    """
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    count = len(shard_samples)
    rng = np.random.default_rng([seed, epoch, PLAN_STREAM])
    permutation = rng.permutation(count)
    rank_in_permutation = np.empty(count, dtype=np.int64)
    rank_in_permutation[permutation] = np.arange(count)
    bins = world_size * slots_per_rank
    # Bin b is (rank b % world, slot b // world): equal loads go round the ranks first.
    heap = [(0, b) for b in range(bins)]
    members: list[list[int]] = [[] for _ in range(bins)]
    loads = [0] * bins
    for shard in sorted(range(count), key=lambda s: (-shard_samples[s], rank_in_permutation[s])):
        load, b = heapq.heappop(heap)
        members[b].append(shard)
        loads[b] = load + shard_samples[shard]
        heapq.heappush(heap, (loads[b], b))
    shards, pairs, capacity = [], [], []
    for rank in range(world_size):
        rank_shards, rank_pairs = [], []
        for slot in range(slots_per_rank):
            b = slot * world_size + rank
            rank_shards.append(tuple(sorted(members[b], key=lambda s: rank_in_permutation[s])))
            rank_pairs.append(loads[b] * captions // images)
        shards.append(tuple(rank_shards))
        pairs.append(tuple(rank_pairs))
        capacity.append([p // batch_size for p in rank_pairs])
    per_rank = min(sum(c) for c in capacity)
    if per_rank < 1:
        raise ValueError(
            f"{count} shards ({sum(shard_samples)} images) give some rank less than one batch of {batch_size} pairs "
            f"with {world_size} ranks x {slots_per_rank} loader workers; use fewer ranks or workers, smaller "
            "batches, or reshard into more shards")
    batches = []
    for rank_capacity in capacity:
        # Spread the rank's batches over its slots as evenly as their capacities allow.
        made = [0] * slots_per_rank
        for _ in range(per_rank):
            open_slots = [s for s in range(slots_per_rank) if made[s] < rank_capacity[s]]
            made[min(open_slots, key=lambda s: (made[s], s))] += 1
        batches.append(tuple(made))
    return EpochPlan(epoch=epoch, world_size=world_size, slots_per_rank=slots_per_rank, batch_size=batch_size,
                     shards=tuple(shards), pairs=tuple(pairs), batches=tuple(batches))


# --------------------------------------------------------------------------------------------------
# Reading shards in one process: opening, hashing, parsing, checking, the bad-data policy
# --------------------------------------------------------------------------------------------------
