"""Read sharded splits (data_shards/format.py) for training and evaluation.

Two readers share one reading engine:

* `TrainReader` gives each rank an epoch of (image, caption) batches: every caption once per
  epoch, as the reference's caption-level epoch, with the same number of batches on every rank.
* `EvalReader` gives every image and every caption exactly once, in source order, so that an
  encoder's outputs line up as `images` (N, D) and `captions` (5N, D) with captions 5i..5i+4
  belonging to image i.

Both take a `ReaderConfig` and a `tokenize` function (`str -> list[int]`, e.g. the trainer's
`Vocabulary.encode`, which returns [<start>, ids..., <end>]); this package knows nothing of the
model.

Where the shards are
--------------------
`config.location` is a split's directory (local path, `file://` or `s3://bucket/prefix`) holding
`manifest.json` and the shards; `config.shards` optionally selects some of them by name or brace
pattern (`"train-{000000..000009}.tar"`), all of which must be in the manifest (the manifest's
sample counts are what makes the accounting below exact). S3 endpoint and credentials come from
`config.storage_options` or the environment (data_shards/storage.py); the main process reads the
manifest, and each loader worker builds its own s3fs filesystem on first use
(`storage.open_url`), because fsspec instances are not fork-safe.

The training epoch: equal batches per rank, without communication
------------------------------------------------------------------
Every rank computes the same `EpochPlan` from (seed, epoch, world size, loader workers, the
manifest's sample counts):

1. the shards are permuted with a generator seeded by (seed, epoch);
2. they are dealt to the world_size x num_workers "slots" (one slot is one loader worker of one
   rank) by longest-processing-time greedy balancing on sample count (ties: the permutation), and
   each slot reads its shards in permutation order;
3. a slot's capacity is its images x (manifest captions / manifest images) pairs, in whole
   batches; the batches per rank are the minimum over ranks of the sum of its slots' capacities,
   and each rank spreads them over its slots as evenly as the capacities allow.

The remainder: pairs beyond that (less than one batch per slot, plus the imbalance between ranks
that whole shards cannot remove) are not read or not emitted this epoch. Because the shard
permutation and the slot shuffles change with the epoch, the dropped pairs differ from epoch to
epoch. When the capacity is an overestimate (images with fewer than five captions, samples skipped
as bad), a slot tops up its last batches with a second pass over its shards: the epoch still has
exactly the planned batches, and `topup_images` counts the re-read images. webdataset's
`with_epoch`/resampling are not used: their epoch boundaries are approximate.

Shuffling, and two captions of one image in a batch
---------------------------------------------------
Inside a slot, decoded images enter a pool of `pool_images` images (default 8 x batch size); each
batch takes one caption from each of `batch_size` distinct images drawn at random from the pool
(an image leaves the pool when all its captions are out, which takes ~5 x pool / batch batches).
Two captions of one image therefore never share a batch except in a slot's last batches, when
fewer than `batch_size` images are left. A plain shuffle buffer of L (image, caption) pairs, which
an image's five pairs enter together, puts about B^2 / L same-image pairs in a batch of B: below
0.1 per batch of 128 it would need L ~ 160,000 pairs, some 70,000 distinct images (~10 GB of
float16 features) per worker. Batches carry image ids anyway, so the loss can mask the rare
same-image pairs. As with any streaming reader, images are mixed within a window (the pool, across
shards in permuted order), not over the whole split. All randomness comes from numpy generators
seeded by (seed, epoch, rank, slot[, batch]); nothing depends on torch's per-worker seeds.

Loader workers and order
------------------------
Batches are made inside the dataset (DataLoader(batch_size=None)). torch's DataLoader takes
batches from its workers round-robin, skipping exhausted ones; the order of a rank's epoch is
therefore a pure function of (seed, epoch, world size, rank, num_workers), and each batch carries
its position (`index`). The DataLoader must have exactly `config.num_workers` workers
(`TrainReader.epoch` builds it so); a different count is refused.

Resume
------
`start_batch=k` restarts an epoch at batch k: the plan says how many of the first k batches each
slot produced; each worker replays its slot up to there (reading and checking, but without
collating or tokenizing) and the loader's workers are rotated so that round-robin continues with
the slot that batch k came from. Batches k.. equal those of an uninterrupted epoch. Slots whose
batches were all consumed read nothing; the others re-read what they had read before batch k (at
most one epoch of reading, at reader speed).

Bad data
--------
The policy (`bad_data`) is `strict` (raise `ShardFormatError` naming the shard and the sample key)
or `skip` (skip, log one warning per shard and epoch in each worker, count in the stats). Checked: a shard that cannot be
opened; a tar that is corrupt or truncated (tarfile in stream mode ends silently at a damaged
header, so every shard's sample count is compared with the manifest's); sha256 against the
manifest; each sample's decoding (missing members, unreadable .npy, invalid or non-UTF-8 JSON),
feature shape and dtype against the manifest, NaN/Inf features, boxes, empty captions, the split
name, and boxes when `region_order="area"`. Images with a number of captions other than five are
allowed and counted (`images_caption_count_not_5`).

Checksums (`checksums`): `"stream"` (default) hashes the bytes as they are parsed, at no extra
I/O; a mismatch is known at the end of the shard, when its samples have already been used:
`strict` then stops the run, `skip` counts the shard in `checksum_mismatches`. `"before"` copies
each shard into a spooled temporary file (memory up to `spool_bytes`, then local disk) while
hashing and parses it only if it matches (no bad byte ever reaches the model; costs one local
copy per shard, no extra network transfer). `"off"` trusts the bytes (the per-sample checks
still apply). The sample-count check runs in every mode.

Stats across processes
----------------------
Each batch carries `stats`: the counters its worker incremented since its previous batch. The
readers add them up in the main process (`reader.stats`, a `ReaderStats`), which the trainer
exports as metrics. Counters: shards_opened, shards_completed, images_read, skipped_samples (and
skipped_samples/<reason>), bad_shards (and bad_shards/<reason>), checksum_mismatches,
images_caption_count_not_5, topup_images. They count events: a bad sample read again (top-up
pass, resume replay, next epoch) counts again.

Batches
-------
`TrainBatch`: regions (B, R, D) float32 (or float16 if asked), boxes (B, R, 4) float32 or None,
tokens (B, T) int64 padded with 0, lengths (B,) int64 (with <start>/<end> if the tokenizer adds
them: what the text encoder and the caption loss read), image_ids (B,) int64 (the meta `index`:
the image's position in its source split, unique within a split, not across splits),
caption_index (B,) int64 (which of the image's captions), keys, captions, epoch, index, slot,
stats. `EvalBatch`: the images of one chunk of one shard with all their captions flattened in
order, plus caption_image_ids.

How a batch is made, and where the memory is
--------------------------------------------
Every caption of an image makes a training pair, so an image's features end up in about five
batches. A loader worker copies each image's features once into a row of its pool, which lives
in shared memory (`_RowPool`); for each batch it sends the captions, tokens, ids and pool row
numbers (small arrays, by value through the DataLoader's pipe). The main process maps the pool
when the worker's first batch arrives and gathers each batch's regions from it (`np.take`, one
thread) into memory that it reuses once the caller has let go of a batch (`_BatchBuffers`), or
into pinned memory (`pin_memory=True` on a CUDA machine). Rows are recycled only after the main
process has gathered every batch that used them (a counter in the pool's shared memory).
Building each batch in a worker instead costs a fresh shared-memory block per batch, filled
through page faults, five times per image: that was the reader's largest cost
(docs/benchmarks.md). `output_dtype="float16"` halves the bytes per batch; `"stored"` skips any
conversion (the model casts, on its device). The evaluation reader, which uses each image once,
still builds its batches in the workers (`_shared_rows`: memfd + pwritev, no page faults).

Memory
------
Per training worker: its pool in shared memory, at most pool_images + 2 x batch_size rows of
one image's features (1280 x 147 KB for batches of 128, float16), mapped by the worker and the
main process, which touch only the rows in use (freed rows are reused first); plus the main
process's few batch buffers. Independent of the dataset size. The evaluation reader holds chunks
that arrive ahead of their turn: at most about one shard's worth per worker.

Region order (paper Table 5): "stored" (detector confidence), "area" (descending box area, stable,
as model.vsrn.order_regions; needs boxes), "random" (a fresh permutation per pair and epoch;
evaluation: per image, seeded by (seed, image index)). Reordering here or in the model, not both.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import heapq
import itertools
import logging
import math
import os
import re
import tarfile
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Literal

import braceexpand
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_iterator
from webdataset.tariterators import meta_prefix as wds_meta_prefix
from webdataset.tariterators import meta_suffix as wds_meta_suffix

from data_shards.format import (
    EXPECTED_CAPTIONS,
    MANIFEST_NAME,
    ImageRecord,
    Manifest,
    ShardFormatError,
    decode_sample,
    record_problems,
)
from data_shards.storage import open_location, open_url

log = logging.getLogger(__name__)

Tokenize = Callable[[str], list[int]]
RegionOrder = Literal["stored", "area", "random"]
BadDataPolicy = Literal["strict", "skip"]
ChecksumMode = Literal["stream", "before", "off"]

PAD_ID = 0
CHUNK_SIZE = 1 << 20
# Domain tags keep the generators of the plan, the pools and the region orders independent.
_PLAN_STREAM, _POOL_STREAM, _REGION_STREAM = 0, 1, 2


# --------------------------------------------------------------------------------------------------
# Configuration, stats, batches
# --------------------------------------------------------------------------------------------------


@dataclass
class ReaderConfig:
    """Everything a reader needs besides the tokenizer and the rank."""

    location: str  # split directory with manifest.json: local path, file:// or s3://bucket/prefix
    shards: str | Sequence[str] | None = None  # names or brace patterns selecting shards; None: all
    batch_size: int = 128  # training: (image, caption) pairs per batch per rank; evaluation: images
    num_workers: int = 2  # DataLoader workers per rank (0: read in the calling process)
    seed: int = 0
    pool_images: int | None = None  # images in each worker's shuffle pool; None: 8 x batch_size
    region_order: RegionOrder = "stored"
    bad_data: BadDataPolicy = "strict"
    checksums: ChecksumMode = "stream"
    storage_options: dict[str, Any] | None = None  # s3fs options; None: from the environment
    # "stored": the shards' own dtype, no conversion (the model casts; on a GPU, after the copy)
    output_dtype: Literal["float32", "float16", "stored"] = "float32"
    prefetch_factor: int = 2  # batches each worker prepares ahead
    spool_bytes: int = 256 << 20  # checksums="before": shard bytes kept in memory before spilling to disk

    def __post_init__(self) -> None:
        if not self.location:
            raise ValueError("ReaderConfig.location is empty")
        if self.batch_size < 1:
            raise ValueError(f"ReaderConfig.batch_size must be >= 1, got {self.batch_size}")
        if self.num_workers < 0:
            raise ValueError(f"ReaderConfig.num_workers must be >= 0, got {self.num_workers}")
        if self.seed < 0:
            raise ValueError(f"ReaderConfig.seed must be >= 0, got {self.seed}")
        if self.pool_images is not None and self.pool_images < self.batch_size:
            raise ValueError(f"ReaderConfig.pool_images ({self.pool_images}) must be >= batch_size ({self.batch_size})")
        choices = {"region_order": ("stored", "area", "random"), "bad_data": ("strict", "skip"),
                   "checksums": ("stream", "before", "off"), "output_dtype": ("float32", "float16", "stored")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"ReaderConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.prefetch_factor < 1:
            raise ValueError(f"ReaderConfig.prefetch_factor must be >= 1, got {self.prefetch_factor}")

    @property
    def pool_size(self) -> int:
        return self.pool_images if self.pool_images is not None else 8 * self.batch_size

    @property
    def slots(self) -> int:
        """Reading slots per rank: one per loader worker, one when reading in-process."""
        return max(1, self.num_workers)


class ReaderStats:
    """Counters of one reader, summed over its loader workers in the main process."""

    def __init__(self) -> None:
        self._counts: Counter[str] = Counter()

    def add(self, delta: Mapping[str, int]) -> None:
        self._counts.update(delta)

    def __getitem__(self, name: str) -> int:
        return self._counts.get(name, 0)

    def as_dict(self) -> dict[str, int]:
        """All counters, e.g. for export as metrics (`skipped_samples/<reason>` names included)."""
        return dict(sorted(self._counts.items()))

    def __repr__(self) -> str:
        return f"ReaderStats({self.as_dict()})"


class _BatchTensors:
    """pin_memory/to for the batch dataclasses (torch's pin_memory calls `.pin_memory()`)."""

    _TENSORS: tuple[str, ...] = ()

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
        changes = {name: fn(getattr(self, name)) for name in self._TENSORS if getattr(self, name) is not None}
        return type(self)(**{**self.__dict__, **changes})

    def pin_memory(self) -> Any:
        return self._map(lambda t: t.pin_memory())

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Any:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))


@dataclass
class TrainBatch(_BatchTensors):
    """B (image, caption) pairs; row i pairs image image_ids[i] with its caption caption_index[i]."""

    regions: torch.Tensor  # (B, R, D) in the output dtype, regions in config.region_order
    boxes: torch.Tensor | None  # (B, R, 4) float32 in the same order, if every image has boxes
    tokens: torch.Tensor  # (B, T) int64, padded with 0
    lengths: torch.Tensor  # (B,) int64
    image_ids: torch.Tensor  # (B,) int64: meta index, the position in the source split
    caption_index: torch.Tensor  # (B,) int64: position of the caption among its image's captions
    keys: list[str]
    captions: list[str]
    epoch: int
    index: int  # position of this batch in the rank's epoch (resume with start_batch=index + 1)
    slot: int  # the reading slot (loader worker role) that made it
    stats: dict[str, int] = field(default_factory=dict)  # counter increments since the slot's previous batch

    _TENSORS = ("regions", "boxes", "tokens", "lengths", "image_ids", "caption_index")


@dataclass
class _TrainPart:
    """What a loader worker sends for one training batch: everything but the regions, which the
    main process gathers from the slot's `_RowPool` (`TrainReader.epoch`). The arrays are small
    and travel by value through the DataLoader's pipe: a shared-memory tensor would cost a
    file-descriptor handshake between the processes per batch, more than copying them."""

    index_rows: np.ndarray  # (B,) pool rows, or (B x R,) region rows when `reordered`
    reordered: bool
    boxes: np.ndarray | None  # (B, R, 4) float32
    tokens: np.ndarray  # (B, T) int64
    lengths: np.ndarray
    image_ids: np.ndarray
    caption_index: np.ndarray
    keys: list[str]
    captions: list[str]
    epoch: int
    index: int
    slot: int
    made: int  # the batch's number within its slot's epoch (the pool's `gathered` counter)
    stats: dict[str, int]
    pool: torch.Tensor | None  # the slot's `_RowPool.tensor`, with the slot's first batch only


@dataclass
class EvalBatch(_BatchTensors):
    """Consecutive images of one shard in source order, with all their captions in order."""

    regions: torch.Tensor  # (N, R, D)
    boxes: torch.Tensor | None  # (N, R, 4) or None
    image_ids: torch.Tensor  # (N,) int64, strictly increasing across an evaluation
    keys: list[str]
    captions: list[str]  # the N images' captions, image by image, each image's in stored order
    tokens: torch.Tensor  # (C, T) int64, padded with 0
    lengths: torch.Tensor  # (C,) int64
    caption_image_ids: torch.Tensor  # (C,) int64: the image id of each caption
    shard_position: int  # internal: position of the shard in the selection, for reordering
    chunk: int
    last_in_shard: bool
    stats: dict[str, int] = field(default_factory=dict)

    _TENSORS = ("regions", "boxes", "image_ids", "tokens", "lengths", "caption_image_ids")


# --------------------------------------------------------------------------------------------------
# The split: manifest and shard selection (main process)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardRef:
    """A selected shard: its position in the selection, URL and what the manifest says about it."""

    position: int
    name: str
    url: str
    samples: int
    sha256: str


@dataclass(frozen=True)
class SplitSpec:
    """What loader workers need to read a split: plain, picklable data (no filesystem objects)."""

    location: str
    shards: tuple[ShardRef, ...]
    feature_shape: tuple[int, int]
    feature_dtype: str
    split: str
    images: int  # manifest totals, for the captions-per-image ratio
    captions: int
    storage_options: dict[str, Any]


def load_split(config: ReaderConfig) -> SplitSpec:
    """Read the manifest of `config.location` and resolve `config.shards` against it."""
    location = open_location(config.location, config.storage_options)
    manifest_url = location.child_url(MANIFEST_NAME)
    try:
        text = location.read_text(MANIFEST_NAME)
    except FileNotFoundError as exc:
        raise ShardFormatError(f"{manifest_url}: no manifest; is {config.location} a converted split?") from exc
    manifest = Manifest.from_json(text, where=manifest_url)
    if not manifest.shards or manifest.images < 1:
        raise ShardFormatError(f"{manifest_url}: lists no images")
    by_name = {info.name: i for i, info in enumerate(manifest.shards)}
    if config.shards is None:
        chosen = list(range(len(manifest.shards)))
    else:
        patterns = [config.shards] if isinstance(config.shards, str) else list(config.shards)
        chosen = []
        for pattern in patterns:
            for name in braceexpand.braceexpand(pattern):
                base = name.rstrip("/").rsplit("/", 1)[-1]  # a full URL names the same file
                if base not in by_name:
                    raise ShardFormatError(f"{manifest_url}: selected shard {name!r} is not in the manifest")
                if by_name[base] in chosen:
                    raise ShardFormatError(f"{manifest_url}: shard {base!r} selected twice")
                chosen.append(by_name[base])
        chosen.sort()  # manifest order is source order (evaluation relies on it)
        if not chosen:
            raise ShardFormatError(f"{manifest_url}: the selection {config.shards!r} matches no shard")
    refs = tuple(ShardRef(position=p, name=manifest.shards[i].name, url=location.child_url(manifest.shards[i].name),
                          samples=manifest.shards[i].samples, sha256=manifest.shards[i].sha256)
                 for p, i in enumerate(chosen))
    return SplitSpec(location=location.url, shards=refs, feature_shape=tuple(manifest.feature_shape),
                     feature_dtype=manifest.feature_dtype, split=manifest.split, images=manifest.images,
                     captions=manifest.captions, storage_options=dict(location.storage_options))


# --------------------------------------------------------------------------------------------------
# The epoch plan: a pure function, identical on every rank
# --------------------------------------------------------------------------------------------------


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
    rng = np.random.default_rng([seed, epoch, _PLAN_STREAM])
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


class _ShardStream:
    """A forward-only read stream over a shard that hashes every byte it takes from the shard
    (unless `hashing` is off) and names the shard in messages.

    It reads the shard in large chunks (one read call and one sha256 update per chunk, instead of
    tarfile's 10 KB records) and serves `_tar_files`: the member headers are peeked at in the
    buffer, and `read_member` hands a member's data over with a single copy. It is also the
    `fileobj` of the `tarfile.TarFile` that parses the unusual headers. `seek` only goes forward,
    as in tarfile's stream mode.
    """

    def __init__(self, raw: BinaryIO, url: str, hashing: bool, buffer_size: int = CHUNK_SIZE) -> None:
        self._raw = raw
        self._url = url
        self._digest = hashlib.sha256() if hashing else None
        self._buffer = bytearray(buffer_size)
        self._view = memoryview(self._buffer)
        self._pos = self._end = 0  # the buffered, not yet consumed bytes are _buffer[_pos:_end]
        self._tell = 0  # bytes consumed
        self._eof = False
        self._readinto = getattr(raw, "readinto", None)

    def _raw_read(self, target: memoryview) -> int:
        """Fill `target` from the shard as far as it goes (short only at its end), hashing."""
        got = 0
        while got < len(target):
            if self._readinto is not None:
                n = self._readinto(target[got:])
            else:  # a stream without readinto (tarfile needed only read)
                data = self._raw.read(len(target) - got)
                n = len(data)
                target[got : got + n] = data
            if not n:
                self._eof = True
                break
            if self._digest is not None:
                self._digest.update(target[got : got + n])
            got += n
        return got

    def _fill(self, size: int) -> int:
        """Buffer at least `size` bytes (fewer only at the end of the shard; size <= the buffer
        size); returns the bytes buffered."""
        if self._end - self._pos < size and not self._eof:
            rest = self._end - self._pos
            if rest:  # a few bytes (a header's worth) left at the end of the buffer: move them
                self._buffer[:rest] = self._view[self._pos : self._end].tobytes()
            self._pos, self._end = 0, rest + self._raw_read(self._view[rest:])
        return self._end - self._pos

    def readinto(self, target: bytearray | memoryview) -> int:
        """Fill `target` with the next bytes (short only at the end of the shard). What is not
        buffered goes straight from the shard into `target` when it is at least a buffer's worth."""
        view = memoryview(target).cast("B")
        got = min(self._end - self._pos, len(view))
        view[:got] = self._view[self._pos : self._pos + got]
        self._pos += got
        while got < len(view) and not self._eof:
            if len(view) - got >= len(self._buffer):
                got += self._raw_read(view[got:])
            elif self._fill(1):
                n = min(self._end - self._pos, len(view) - got)
                view[got : got + n] = self._view[self._pos : self._pos + n]
                self._pos += n
                got += n
        self._tell += got
        return got

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            parts = []
            while chunk := self.read(len(self._buffer)):
                parts.append(chunk)
            return b"".join(parts)
        if self._end - self._pos >= size:  # headers: straight from the buffer
            data = self._view[self._pos : self._pos + size].tobytes()
            self._pos += size
            self._tell += size
            return data
        out = bytearray(size)
        got = self.readinto(out)
        return bytes(out) if got == size else bytes(out[:got])

    def read_member(self, size: int) -> bytes | memoryview:
        """A member's `size` data bytes, or tarfile's ReadError (as from its extractfile) if the
        shard ends first. Large members come as a writable memoryview of an uninitialized numpy
        buffer (bytearray(size) would zero it first), which the .npy decoder uses in place."""
        if size < _LARGE_MEMBER:
            data: bytes | memoryview = self.read(size)
            got = len(data)
        else:
            data = memoryview(np.empty(size, dtype=np.uint8))
            got = self.readinto(data)
        if got != size:
            raise tarfile.ReadError("unexpected end of data")
        return data

    def peek(self, size: int) -> bytes:
        """Up to `size` next bytes, without consuming them (size <= the buffer size)."""
        available = self._fill(size)
        return self._view[self._pos : self._pos + min(size, available)].tobytes()

    def skip_buffered(self, size: int) -> None:
        """Consume `size` bytes that `peek` has just returned."""
        self._pos += size
        self._tell += size

    def tell(self) -> int:
        return self._tell

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        """Forward only (skipped bytes are read and hashed); stops silently at the end of the
        shard, as tarfile's stream mode (its next read then reports the truncation)."""
        if whence != os.SEEK_SET or offset < self._tell:
            raise tarfile.StreamError("seeking backwards is not allowed")
        left = offset - self._tell
        while left and self._fill(1):
            n = min(left, self._end - self._pos)
            self._pos += n
            self._tell += n
            left -= n
        return self._tell

    def drain(self) -> None:
        """Hash the rest (tarfile stops at the end-of-archive blocks, before the padding)."""
        self._pos = self._end
        while self._fill(1):
            self._pos = self._end

    def hexdigest(self) -> str | None:
        return None if self._digest is None else self._digest.hexdigest()

    def __str__(self) -> str:
        return self._url


# Members of at least this size are read into a buffer of their own (see read_member).
_LARGE_MEMBER = 1 << 16

# Compressed tars, which tarfile.open(mode="r|*") (webdataset) unpacks transparently: its
# _StreamProxy.getcomptype tests these magics (plus zstd from Python 3.14). The converter writes
# plain tars; a compressed shard is still read as before, through webdataset's tar_file_iterator.
_COMPRESSED_MAGIC = (b"\x1f\x8b\x08", b"\x5d\x00\x00\x80", b"\xfd7zXZ", b"\x28\xb5\x2f\xfd")
_SKIP_META = re.compile(r"__[^/]*__($|/)")  # webdataset.tariterators.tar_file_iterator's skip_meta
# A numeric header field that tarfile.nti certainly reads as octal: spaces, octal digits, spaces,
# then anything after a NUL (nts cuts there). Anything else (base-256, other whitespace, junk) is
# left to tarfile, which accepts it or declares the header invalid.
_PLAIN_NUMBER = re.compile(rb" *[0-7]* *(?:\0.*)?", re.DOTALL)
_NUMBER_FIELDS = ((100, 108), (108, 116), (116, 124), (124, 136), (136, 148), (329, 337), (337, 345))


def _is_compressed(head: bytes) -> bool:
    return head.startswith(_COMPRESSED_MAGIC) or (head[0:3] == b"BZh" and head[4:10] == b"1AY&SY")


def _octal(field: bytes) -> int:
    """tarfile.nti of a field that matches _PLAIN_NUMBER."""
    return int(field.split(b"\0", 1)[0].strip() or b"0", 8)


def _plain_member(block: bytes, encoding: str, errors: str) -> tuple[str, int] | None:
    """(name, size) of a header that tarfile.TarInfo.frombuf would read as a plain regular file
    (type "0", valid checksum, every numeric field plain octal, no ustar name prefix), else None.

    frombuf costs some 40 us per header (struct-unpacked checksums, a dozen field parsers); this
    checks the same things in a few, for the headers the converter writes, and leaves every other
    header (pax, GNU long names, links, damaged, end of archive) to tarfile itself. Within a shard
    the headers differ only in name, size and checksum: the checks and the byte sum of the rest
    are remembered (`_STATIC_FIELDS`).
    """
    if len(block) != tarfile.BLOCKSIZE:
        return None
    static = block[100:124] + block[136:148] + block[156:]
    static_sum = _STATIC_FIELDS.get(static)
    if static_sum is None:
        if block[156] != 0x30 or block[345] != 0 or not all(
                _PLAIN_NUMBER.fullmatch(block, a, b) for a, b in _NUMBER_FIELDS if a not in (124, 148)):
            return None
        if len(_STATIC_FIELDS) >= 64:
            _STATIC_FIELDS.clear()
        static_sum = _STATIC_FIELDS[static] = sum(static)
    size_field, checksum_field = block[124:136], block[148:156]
    if not (_PLAIN_NUMBER.fullmatch(size_field) and _PLAIN_NUMBER.fullmatch(checksum_field)):
        return None
    # tarfile accepts the unsigned or the signed byte sum; the unsigned one is what writers use
    # (the checksum field counts as eight spaces).
    name_field = block[:100]
    if _octal(checksum_field) != 256 + static_sum + sum(name_field) + sum(size_field):
        return None
    return name_field.split(b"\0", 1)[0].decode(encoding, errors), _octal(size_field)


# Header bytes other than name, size and checksum that passed _plain_member's checks -> their byte sum.
_STATIC_FIELDS: dict[bytes, int] = {}


def _tar_files(stream: _ShardStream, url: str) -> Iterator[dict[str, Any]]:
    """The shard's files as webdataset's tar_file_iterator yields them ({"fname", "data",
    "__url__"}: regular files only, webdataset's meta files skipped), for its group_by_keys.

    Plain regular-file headers are checked here (`_plain_member`); every other header goes to a
    `tarfile.TarFile` over the same stream (TarFile.next: the same checks and errors as tarfile's
    stream mode, which ends silently at a damaged header after the first one). Member data are
    read by `stream.read_member`.
    """
    if _is_compressed(stream.peek(10)):
        yield from ({**f, "__url__": url} for f in tar_file_iterator(stream))
        return
    tar = tarfile.TarFile(fileobj=stream, mode="r")  # type: ignore[arg-type]  # parses the first header
    info: tarfile.TarInfo | None = tar.next()
    while info is not None:
        tar.members.clear()  # TarFile lists every member; nothing here needs them (flat memory)
        yield from _tar_file(tar, info, stream, url)
        # The next header, where tarfile would look for it: TarFile.next's padding check first.
        if tar.offset != stream.tell():
            stream.seek(tar.offset - 1)
            if not stream.read(1):
                raise tarfile.ReadError("unexpected end of data")
        plain = None if tar.pax_headers else _plain_member(stream.peek(tarfile.BLOCKSIZE), tar.encoding, tar.errors)
        if plain is None:
            info = tar.next()
            continue
        stream.skip_buffered(tarfile.BLOCKSIZE)
        info = tarfile.TarInfo(plain[0])
        info.size, info.type, info.offset_data = plain[1], tarfile.REGTYPE, stream.tell()
        tar.offset = info.offset_data + -(-info.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def _tar_file(tar: tarfile.TarFile, info: tarfile.TarInfo, stream: _ShardStream, url: str) -> Iterator[dict[str, Any]]:
    """The file of one member as tar_file_iterator yields it, if it yields it."""
    name = info.name
    if not info.isreg():
        return
    if "/" not in name and name.startswith(wds_meta_prefix) and name.endswith(wds_meta_suffix):
        return
    if _SKIP_META.match(name):
        return
    try:
        if info.sparse is not None:  # GNU sparse member: tarfile fills in the holes
            data: bytes | memoryview = tar.extractfile(info).read()  # type: ignore[union-attr]
        else:
            data = stream.read_member(info.size)
    except Exception as exc:
        if exc.args:  # as tar_file_iterator does
            exc.args = (f"{exc.args[0]} @ {url}",) + exc.args[1:]
        raise
    yield {"fname": name, "data": data, "__url__": url}


def _problem_reason(problem: str) -> str:
    """A short stats label for a phrase of format.record_problems or a decoding error."""
    for prefix, reason in (("feature shape", "feature_shape"), ("feature dtype", "feature_dtype"),
                           ("features contain", "nonfinite"), ("boxes", "boxes"), ("no boxes", "missing_boxes"),
                           ("no captions", "no_captions"), ("split", "split")):
        if problem.startswith(prefix):
            return reason
    if problem.startswith("caption") and "empty" in problem:
        return "empty_caption"
    return "invalid_sample"


class _ShardSource:
    """Turns shards into checked `ImageRecord`s in the calling process, applying the policy.

    Counters go to `self.counts`; the caller moves them into its batches.
    """

    def __init__(self, spec: SplitSpec, config: ReaderConfig) -> None:
        self.spec = spec
        self.policy = config.bad_data
        self.checksums = config.checksums
        self.need_boxes = config.region_order == "area"
        self.spool_bytes = config.spool_bytes
        self.counts: Counter[str] = Counter()
        self._warned: set[str] = set()

    def take_counts(self) -> dict[str, int]:
        counts = dict(self.counts)
        self.counts.clear()
        return counts

    def _warn_once(self, shard: ShardRef, message: str) -> None:
        if shard.url not in self._warned:
            self._warned.add(shard.url)
            log.warning("%s (skipped; further problems in this shard are only counted in the reader stats)", message)

    def _sample_problem(self, shard: ShardRef, reason: str, message: str) -> None:
        if self.policy == "strict":
            raise ShardFormatError(message)
        self.counts["skipped_samples"] += 1
        self.counts[f"skipped_samples/{reason}"] += 1
        self._warn_once(shard, message)

    def _shard_problem(self, shard: ShardRef, reason: str, message: str, lost_samples: int) -> None:
        if self.policy == "strict":
            raise ShardFormatError(message)
        self.counts["bad_shards"] += 1
        self.counts[f"bad_shards/{reason}"] += 1
        if lost_samples:
            self.counts["skipped_samples"] += lost_samples
            self.counts[f"skipped_samples/{reason}"] += lost_samples
        self._warn_once(shard, message)

    def _check(self, shard: ShardRef, sample: dict[str, Any]) -> ImageRecord | None:
        key = sample.get("__key__", "?")
        try:
            record = decode_sample(sample)
        except ShardFormatError as exc:
            self._sample_problem(shard, "non_utf8" if "not UTF-8" in str(exc) else "corrupt_sample", str(exc))
            return None
        problems = record_problems(record, self.spec.feature_shape, self.spec.feature_dtype)
        if self.need_boxes and record.boxes is None:
            problems.append("no boxes (region_order='area' needs them)")
        if self.spec.split and record.split != self.spec.split:
            problems.append(f"split {record.split!r} != manifest split {self.spec.split!r}")
        if problems:
            self._sample_problem(shard, _problem_reason(problems[0]), f"{shard.url}: sample {key}: {'; '.join(problems)}")
            return None
        if len(record.captions) != EXPECTED_CAPTIONS:
            self.counts["images_caption_count_not_5"] += 1
        self.counts["images_read"] += 1
        return record

    def _verified_copy(self, shard: ShardRef, raw: BinaryIO) -> BinaryIO | None:
        """checksums="before": a spooled copy of the shard if its sha256 matches, else None."""
        spool = tempfile.SpooledTemporaryFile(max_size=self.spool_bytes)  # noqa: SIM115 - returned to the caller
        digest = hashlib.sha256()
        try:
            while chunk := raw.read(CHUNK_SIZE):
                digest.update(chunk)
                spool.write(chunk)
        except Exception as exc:  # noqa: BLE001 - a broken connection or file: the shard is unreadable
            spool.close()
            self._shard_problem(shard, "unreadable_shard", f"{shard.url}: read failed ({exc!r})", shard.samples)
            return None
        if digest.hexdigest() != shard.sha256:
            spool.close()
            self._shard_problem(shard, "checksum", f"{shard.url}: sha256 {digest.hexdigest()} != manifest "
                                f"{shard.sha256}; none of its samples was used", shard.samples)
            return None
        spool.seek(0)
        return spool  # type: ignore[return-value]

    def records(self, shard: ShardRef) -> Iterator[ImageRecord]:
        """The shard's valid records, in stored order."""
        self.counts["shards_opened"] += 1
        try:
            raw = open_url(shard.url, self.spec.storage_options)
        except OSError as exc:  # FileNotFoundError, PermissionError, storage.StorageError ...
            self._shard_problem(shard, "missing_shard", f"{shard.url}: cannot open shard ({exc})", shard.samples)
            return
        with contextlib.ExitStack() as stack:
            stack.callback(raw.close)
            source: BinaryIO | None = raw
            if self.checksums == "before":
                source = self._verified_copy(shard, raw)
                if source is None:
                    return
                stack.callback(source.close)
            stream = _ShardStream(source, shard.url, hashing=self.checksums == "stream")
            samples = group_by_keys(_tar_files(stream, shard.url))
            seen, last_key = 0, None
            while True:
                try:
                    sample = next(samples)
                except StopIteration:
                    break
                except Exception as exc:  # noqa: BLE001 - tarfile/webdataset/storage errors: the shard is lost
                    where = f"after sample {last_key}" if last_key else "before its first sample"
                    detail = str(exc.args[0]) if exc.args else repr(exc)  # member read errors end in " @ <url>"
                    self._shard_problem(shard, "unreadable_shard", f"{shard.url}: corrupt or truncated tar {where} "
                                        f"({type(exc).__name__}: {detail})", max(0, shard.samples - seen))
                    return
                seen += 1
                last_key = sample.get("__key__")
                record = self._check(shard, sample)
                if record is not None:
                    yield record
            if seen != shard.samples:
                # tarfile's stream mode ends silently at a damaged or truncated header.
                self._shard_problem(shard, "sample_count", f"{shard.url}: {seen} samples (the last: {last_key}) but the "
                                    f"manifest says {shard.samples}: truncated or corrupt tar",
                                    max(0, shard.samples - seen))
                return
            if self.checksums == "stream":
                try:
                    stream.drain()
                except Exception as exc:  # noqa: BLE001 - a connection lost at the very end
                    self._shard_problem(shard, "unreadable_shard", f"{shard.url}: read failed after sample {last_key} "
                                        f"({exc!r})", 0)
                    return
                if stream.hexdigest() != shard.sha256:
                    message = (f"{shard.url}: sha256 {stream.hexdigest()} != manifest {shard.sha256} (found at the end "
                               f"of the shard, after sample {last_key}; its samples were already used)")
                    if self.policy == "strict":
                        raise ShardFormatError(message)
                    self.counts["checksum_mismatches"] += 1
                    self._warn_once(shard, message)
                    return
            self.counts["shards_completed"] += 1


# --------------------------------------------------------------------------------------------------
# Batching helpers
# --------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _PooledImage:
    """An image in a slot's caption pool: what its batches need, its features being in `row` of
    the slot's `_RowPool`."""

    key: str
    captions: list[str]
    index: int
    boxes: np.ndarray | None
    row: int


class _CaptionPool:
    """The per-slot shuffle: a pool of images; each batch takes one caption from each of
    `batch_size` distinct images drawn at random (see the module docstring). `on_leave` is told
    of each image whose last caption a batch has just taken."""

    def __init__(self, capacity: int, batch_size: int, rng: np.random.Generator,
                 on_leave: Callable[[_PooledImage], None] | None = None) -> None:
        self.capacity = capacity
        self.batch_size = batch_size
        self.rng = rng
        self.on_leave = on_leave
        self.entries: list[tuple[_PooledImage, list[int]]] = []  # (image, its captions not yet used)

    def _take(self, picks: Sequence[int]) -> list[tuple[_PooledImage, int]]:
        pairs = [(self.entries[i][0], self.entries[i][1].pop()) for i in picks]
        kept = []
        for entry in self.entries:
            if entry[1]:
                kept.append(entry)
            elif self.on_leave is not None:
                self.on_leave(entry[0])
        self.entries = kept
        return pairs

    def batches(self, images: Iterator[_PooledImage]) -> Iterator[list[tuple[_PooledImage, int]]]:
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
                pairs: list[tuple[_PooledImage, int]] = []
                while len(pairs) < self.batch_size:
                    picks = self.rng.permutation(len(self.entries))[: self.batch_size - len(pairs)]
                    pairs.extend(self._take(picks.tolist()))
                yield pairs
            else:
                return


def _shared_storage(nbytes: int) -> torch.UntypedStorage:
    """`nbytes` of memory that a loader worker can hand to the main process without a copy
    (memfd where torch shares by file descriptor, else torch's own shared memory); plain memory
    in the calling process. Shared pages are not zero-filled by anyone but the kernel, on first
    touch."""
    if get_worker_info() is None:
        return torch.UntypedStorage(nbytes)
    if not _fd_sharing():
        return torch.UntypedStorage._new_shared(nbytes)
    return _memfd_storage(nbytes)


def _memfd_storage(nbytes: int, fill: Callable[[int], None] | None = None) -> torch.UntypedStorage:
    """A storage over a new memfd of `nbytes`, after `fill(fd)` has written into it (if given);
    torch shares it with other processes by this file descriptor."""
    fd = os.memfd_create("vsrn-reader", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, nbytes)
        if fill is not None:
            fill(fd)
        return torch.UntypedStorage._new_shared_fd_cpu(fd, nbytes)  # maps a dup of fd
    finally:
        os.close(fd)


class _RowPool:
    """A slot's image features in shared memory, written once per image by the loader worker and
    gathered into batches by the main process (`_gather_regions`).

    Every caption of an image makes a training pair, so an image's features end up in about five
    batches; built in the worker, each batch would be a fresh shared-memory block written through
    page faults (the reader's largest cost, docs/benchmarks.md). Instead each image crosses
    between the processes once: the worker copies it into a free row of this pool, whose memory
    the main process has mapped since the slot's first batch, and a batch carries row numbers.

    A row is reused only after the main process has gathered every batch that used it. The
    worker tags a row with the slot batch (`made`) that took its image's last caption; the main
    process writes into the shared `gathered` counter the last slot batch it has gathered (the
    first 8 bytes of the storage). A worker never waits on a batch it has not sent, and the main
    process gathers a slot's batches in order, so the wait below always ends (the DataLoader's
    prefetch keeps the worker at most a few batches ahead).
    """

    HEADER = 64  # bytes before the rows: the int64 `gathered` counter, padded

    def __init__(self, rows: int, feature_shape: tuple[int, int], dtype: np.dtype, gathered: int) -> None:
        storage = _shared_storage(self.HEADER + rows * math.prod(feature_shape) * dtype.itemsize)
        self.tensor = torch.empty(0, dtype=torch.uint8).set_(storage, 0, (storage.nbytes(),))
        self.rows, self.gathered = self.layout(self.tensor, feature_shape, dtype)
        self.gathered[0] = gathered  # batches before a resume point are never gathered
        self.free = list(range(rows - 1, -1, -1))
        self.pending: collections.deque[tuple[int, int]] = collections.deque()  # (made, row), made ascending

    @classmethod
    def layout(cls, tensor: torch.Tensor, feature_shape: tuple[int, int],
               dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
        """(rows (N, *feature_shape), gathered counter (1,) int64): arrays over a pool's memory
        (`_RowPool.tensor`, in the worker or as received by the main process)."""
        memory = tensor.numpy()
        return memory[cls.HEADER:].view(dtype).reshape(-1, *feature_shape), memory[:8].view(np.int64)

    def put(self, regions: np.ndarray) -> int:
        """Copy one image's features into a free row; its number."""
        row = self._acquire()
        self.rows[row] = regions
        return row

    def release(self, row: int, made: int) -> None:
        """`row` is free once the main process has gathered slot batch `made`."""
        self.pending.append((made, row))

    def _acquire(self) -> int:
        # Rows the main process is done with are taken before untouched ones (the free list is a
        # stack), so only as many rows are ever touched, in both processes, as are in use at once.
        delay = 1e-4
        while True:
            if self.pending:
                gathered = int(self.gathered[0])
                while self.pending and self.pending[0][0] <= gathered:
                    self.free.append(self.pending.popleft()[1])
            if self.free:
                return self.free.pop()
            if os.getppid() == 1:  # the main process is gone (torch's workers watch for this too)
                raise RuntimeError("the reader's main process exited while a loader worker waited for it")
            time.sleep(delay)
            delay = min(2 * delay, 1e-2)


class _BatchBuffers:
    """The main process's memory for batch regions, reused once nothing else holds it.

    A fresh 19 MB batch (128 x 36 x 2048 float16) costs thousands of page faults, more than
    filling it, whenever the allocator hands back new pages (it does for float32 batches, above
    glibc's mmap threshold, and often for float16 ones). A buffer is handed out as a view, and
    it is taken again only when its storage has no user but this pool: a batch still referenced
    by the caller, or saved by autograd for a backward pass, keeps its buffer.
    """

    def __init__(self, keep: int = 4) -> None:
        self.keep = keep
        self.buffers: list[torch.Tensor] = []

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        for buffer in self.buffers:
            if buffer.shape == shape and buffer.dtype == dtype and self._free(buffer):
                return buffer.view(shape)
        buffer = torch.empty(shape, dtype=dtype)
        self.buffers.append(buffer)
        if len(self.buffers) > self.keep:
            # Forget the oldest buffer still in use (its holder frees it), else the oldest.
            self.buffers.pop(next((i for i, b in enumerate(self.buffers) if not self._free(b)), 0))
        return buffer.view(shape)

    @staticmethod
    def _free(buffer: torch.Tensor) -> bool:
        # Two users when nothing else holds it: `buffer` itself and the temporary storage object.
        return torch._C._storage_Use_Count(buffer.untyped_storage()._cdata) == 2


def _gather_regions(features: np.ndarray, index: np.ndarray, reordered: bool, out: torch.Tensor,
                    scratch: _BatchBuffers) -> None:
    """Fill `out` (B, R, D) with a batch's regions from a slot's pool: `index` holds B pool rows,
    or, when the regions are `reordered`, B x R rows of the (rows x R, D) region table.

    numpy's take, single-threaded: the main process also runs the training step, and torch's
    intra-op threads would spin on the cores the loader workers use. (mode="clip" because with
    "raise" numpy buffers `out`; the indices come from the pool and are in range.)
    """
    regions, dim = features.shape[1:]
    source = features.reshape(-1, dim) if reordered else features
    if out.dtype == _TORCH_DTYPES[features.dtype]:
        target = out.numpy()
        np.take(source, index, axis=0, out=target.reshape(-1, dim) if reordered else target, mode="clip")
        return
    staged = scratch.take(tuple(out.shape), _TORCH_DTYPES[features.dtype])
    _gather_regions(features, index, reordered, staged, scratch)
    out.copy_(staged)  # torch converts float16 <-> float32 several times faster than numpy


def _region_index(boxes: np.ndarray | None, regions: int, order: RegionOrder,
                  rng: np.random.Generator | None) -> np.ndarray | None:
    """(R,) index putting one image's regions in `order`; None for stored order.

    "area": descending box area, stable (as model.vsrn.order_regions); "random": a permutation
    drawn from `rng`.
    """
    if order == "stored":
        return None
    if order == "area":
        assert boxes is not None  # checked per sample when region_order == "area"
        area = np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)
        return np.argsort(-area, kind="stable")
    assert rng is not None
    return rng.permutation(regions)


def _empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A new tensor; inside a loader worker it is allocated in shared memory, as torch's
    default_collate does, so that handing the batch to the main process copies nothing (the
    copy would cost as much as building the batch)."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    template = torch.empty(0, dtype=dtype)
    storage = template._typed_storage()._new_shared(math.prod(shape))
    return template.new(storage).resize_(shape)


def _tokens(tokenize: Tokenize, captions: Sequence[str], keys: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Tokenize and pad with 0: (tokens (C, T) int64, lengths (C,) int64), as numpy arrays (see
    `_long_tensors`).

    The padded matrix is filled in one numpy assignment (row-major mask), not row by row: a
    torch slice assignment per caption cost more than the tokenizer itself."""
    ids = [tokenize(caption) for caption in captions]
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    if len(ids) and lengths.min() == 0:
        row = int(np.argmin(lengths))
        raise ValueError(f"tokenize returned no tokens for caption {captions[row]!r} of sample {keys[row]}")
    tokens = np.full((len(ids), int(lengths.max()) if len(ids) else 0), PAD_ID, dtype=np.int64)
    tokens[np.arange(tokens.shape[1]) < lengths[:, None]] = np.fromiter(
        itertools.chain.from_iterable(ids), dtype=np.int64, count=int(lengths.sum()))
    return tokens, lengths


def _long_tensors(*arrays: np.ndarray | Sequence[int]) -> list[torch.Tensor]:
    """int64 tensors of `arrays`, all views of one storage (`_empty`: shared memory in a loader
    worker). torch passes a batch's shared tensors to the main process by file descriptor, one
    handshake with the worker per storage (pickle sends a storage once); one block for the
    small tensors instead of one storage each saves those round trips."""
    values = [np.asarray(a, dtype=np.int64) for a in arrays]
    total = sum(v.size for v in values)
    block = _empty((total,), torch.long) if total else torch.empty(0, dtype=torch.long)
    flat = block.numpy()
    tensors, offset = [], 0
    for v in values:
        flat[offset : offset + v.size] = v.reshape(-1)
        tensors.append(block[offset : offset + v.size].view(v.shape))
        offset += v.size
    return tensors


# Batches written into shared memory with pwritev (see _shared_rows). IOV_MAX: buffers per call.
_IOV_MAX = max(1, min(os.sysconf("SC_IOV_MAX"), 1024)) if hasattr(os, "sysconf") else 16
_CONVERT_ROWS = 16  # rows converted per write when the dtype changes (36 x 2048 float32: a 4.7 MB scratch)
_scratch: dict[tuple[torch.dtype, tuple[int, ...]], torch.Tensor] = {}  # per process (worker)
_NUMPY_DTYPES = {torch.float16: np.dtype(np.float16), torch.float32: np.dtype(np.float32)}  # output dtypes
_TORCH_DTYPES = {numpy_dtype: torch_dtype for torch_dtype, numpy_dtype in _NUMPY_DTYPES.items()}


def _fd_sharing() -> bool:
    """Whether batches can be built in memfd shared memory: Linux memfd/pwritev, and torch sharing
    tensors between processes by file descriptor (its default on Linux; with "file_system",
    torch would copy such a tensor into a shared file of its own when sending it)."""
    return (hasattr(os, "memfd_create") and hasattr(os, "pwritev")
            and hasattr(torch.UntypedStorage, "_new_shared_fd_cpu")
            and torch.multiprocessing.get_sharing_strategy() == "file_descriptor")


def _pwrite_all(fd: int, buffers: Sequence[np.ndarray], offset: int) -> None:
    """Write the C-contiguous `buffers` one after another at `offset` (pwritev may write less)."""
    views = [memoryview(b).cast("B") for b in buffers]
    first = 0
    while first < len(views):
        written = os.pwritev(fd, views[first : first + _IOV_MAX], offset)
        if written <= 0:
            raise OSError(f"pwritev wrote {written} bytes to a batch buffer")
        offset += written
        while written:
            if written >= len(views[first]):
                written -= len(views[first])
                first += 1
            else:
                views[first] = views[first][written:]
                written = 0


def _shared_rows(rows: Sequence[np.ndarray], dtype: torch.dtype) -> torch.Tensor:
    """`rows` stacked into a (N, *row shape) tensor of `dtype` in shared memory (a loader worker's
    batch), written into a memfd with pwritev rather than through a mapping.

    Writing a fresh shared-memory tensor through its mapping (torch's _new_shared, as
    default_collate) costs a page fault per 4 KB page plus torch's zero-filling fallocate: three
    times the copy itself for a float16 batch of 128 x 36 x 2048. pwritev fills the memfd's pages
    in the kernel without faults or zeroing, and the tensor maps them only when it is read. torch
    passes the tensor to the main process by this file descriptor, as its own shared tensors.
    float16 -> float32 goes through a small per-process scratch (torch converts ~25 times faster
    than numpy), _CONVERT_ROWS rows per write.
    """
    shape = (len(rows), *rows[0].shape)

    def fill(fd: int) -> None:
        if rows[0].dtype == _NUMPY_DTYPES[dtype]:
            _pwrite_all(fd, [np.ascontiguousarray(row) for row in rows], 0)
            return
        key = (dtype, tuple(rows[0].shape))
        if key not in _scratch:
            _scratch[key] = torch.empty((_CONVERT_ROWS, *rows[0].shape), dtype=dtype)
        scratch = _scratch[key]
        for start in range(0, len(rows), _CONVERT_ROWS):
            chunk = rows[start : start + _CONVERT_ROWS]
            for j, row in enumerate(chunk):
                scratch[j].copy_(torch.from_numpy(row))
            _pwrite_all(fd, [scratch[: len(chunk)].numpy()], start * scratch[0].nbytes)

    storage = _memfd_storage(math.prod(shape) * dtype.itemsize, fill)
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape)


def _image_arrays(records: Sequence[ImageRecord], order: RegionOrder, output_dtype: str,
                  rngs: Sequence[np.random.Generator | None]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Regions (N, R, D) in `output_dtype` and boxes (N, R, 4) float32 (None unless every image
    has boxes) of `records`, each row in `order` (random: row i draws from `rngs[i]`).

    In a loader worker the regions go into shared memory by `_shared_rows` where the platform
    allows it. Otherwise conversion uses torch (about twice as fast as numpy for float16 ->
    float32): in a loader worker (one torch thread) each row is converted straight into the
    shared-memory output; in the calling process the rows are stacked first and converted in one
    call, because a call per row would pay torch's intra-op thread pool synchronisation per row,
    which costs milliseconds each when a busy machine deschedules its threads.
    """
    regions_per_image = records[0].regions.shape[0]
    indices = [_region_index(r.boxes, regions_per_image, order, rng) for r, rng in zip(records, rngs)]
    rows = [r.regions if i is None else r.regions[i] for r, i in zip(records, indices)]
    in_worker = get_worker_info() is not None
    if in_worker and _fd_sharing():
        regions = _shared_rows(rows, getattr(torch, output_dtype))
    else:
        regions = _empty((len(rows), *rows[0].shape), getattr(torch, output_dtype))
        if rows[0].dtype == np.dtype(output_dtype):
            np.stack(rows, out=regions.numpy())
        elif in_worker:
            for row, values in enumerate(rows):
                regions[row].copy_(torch.from_numpy(values))
        else:
            regions.copy_(torch.from_numpy(np.stack(rows)))
    boxes = None
    if all(r.boxes is not None for r in records):
        boxes = _empty((len(rows), regions_per_image, 4), torch.float32)
        np.stack([r.boxes if i is None else r.boxes[i] for r, i in zip(records, indices)],  # type: ignore[index]
                 out=boxes.numpy())
    return regions, boxes


def _output_dtype(config: ReaderConfig, spec: SplitSpec) -> str:
    """The dtype of the regions a reader gives ("float16"/"float32")."""
    return spec.feature_dtype if config.output_dtype == "stored" else config.output_dtype


def _worker_slot(slots: int, offset: int = 0) -> tuple[int, int]:
    """(this process's loader worker id, the slot it plays); checks the worker count."""
    info = get_worker_info()
    workers, worker_id = (info.num_workers, info.id) if info is not None else (1, 0)
    if workers != slots:
        raise RuntimeError(f"the reader was planned for {slots} reading slot(s) (ReaderConfig.num_workers) but the "
                           f"DataLoader has {workers} worker(s); read through TrainReader.epoch/EvalReader")
    return worker_id, (worker_id + offset) % slots


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


class TrainDataset(IterableDataset):
    """One rank's epoch as an IterableDataset of batch parts (`_TrainPart`: a batch without its
    regions, which `TrainReader.epoch` gathers from the slot's pool)."""

    def __init__(self, spec: SplitSpec, config: ReaderConfig, tokenize: Tokenize, plan: EpochPlan,
                 rank: int, start_batch: int = 0) -> None:
        super().__init__()
        self.spec, self.config, self.tokenize, self.plan, self.rank = spec, config, tokenize, plan, rank
        self.start_batch = start_batch
        self.skips, self.slot_offset = plan.resume_point(rank, start_batch)
        order = plan.delivery_order(rank)
        self.positions: list[list[int]] = [[] for _ in range(plan.slots_per_rank)]
        for position, slot in enumerate(order):
            self.positions[slot].append(position)

    def __len__(self) -> int:
        return self.plan.batches_per_rank - self.start_batch

    def __iter__(self) -> Iterator[_TrainPart]:
        _, slot = _worker_slot(self.plan.slots_per_rank, self.slot_offset)
        target, skip = self.plan.batches[self.rank][slot], self.skips[slot]
        if skip >= target:
            return
        cfg, epoch = self.config, self.plan.epoch
        shards = [self.spec.shards[p] for p in self.plan.shards[self.rank][slot]]
        source = _ShardSource(self.spec, cfg)
        # Rows for the caption pool's images (no more than the slot reads), plus those of images
        # that left it in batches the main process may not have gathered yet: about batch_size / 5
        # per batch in flight (an image leaves with its fifth caption), up to batch_size in a
        # slot's last batches. Two batches' worth keeps the worker from waiting in practice; it
        # would only wait, never deadlock, with fewer (see _RowPool).
        slot_images = sum(shard.samples for shard in shards)
        rows = _RowPool(min(cfg.pool_size, slot_images) + 2 * cfg.batch_size, self.spec.feature_shape,
                        np.dtype(self.spec.feature_dtype), gathered=skip - 1)
        made = 0
        pool = _CaptionPool(cfg.pool_size, cfg.batch_size,
                            np.random.default_rng([cfg.seed, epoch, _POOL_STREAM, self.rank, slot]),
                            on_leave=lambda image: rows.release(image.row, made))
        send_pool = True
        for reading in itertools.count():  # pass 0 is the epoch; later passes top up a short slot
            if reading == 1:
                log.warning("epoch %d rank %d slot %d: its shards gave only %d of %d batches; topping up with "
                            "another pass (counted in topup_images)", epoch, self.rank, slot, made, target)
            tally = [0]
            images = self._pass(source, shards, rows, topup=reading > 0, tally=tally)
            batches = pool.batches(images)
            try:
                for pairs in batches:
                    if made >= skip:
                        yield self._collate(pairs, slot, made, source.take_counts(), rows if send_pool else None)
                        send_pool = False
                    made += 1
                    if made == target:
                        return
            finally:
                batches.close()
                images.close()
            if tally[0] == 0:
                raise ShardFormatError(f"epoch {epoch} rank {self.rank} slot {slot}: no readable image left in its "
                                       f"shards ({[s.name for s in shards]}) to make batch {made} of {target}")

    @staticmethod
    def _pass(source: _ShardSource, shards: Sequence[ShardRef], rows: _RowPool, topup: bool,
              tally: list[int]) -> Iterator[_PooledImage]:
        """One pass over the slot's shards, each image's features put into `rows`; `tally[0]`
        counts the images it gave."""
        for shard in shards:
            for record in source.records(shard):
                tally[0] += 1
                if topup:
                    source.counts["topup_images"] += 1
                yield _PooledImage(key=record.key, captions=record.captions, index=record.index, boxes=record.boxes,
                                   row=rows.put(record.regions))

    def _collate(self, pairs: Sequence[tuple[_PooledImage, int]], slot: int, made: int, stats: dict[str, int],
                 rows: _RowPool | None) -> _TrainPart:
        cfg = self.config
        images = [image for image, _ in pairs]
        keys = [image.key for image in images]
        captions = [image.captions[j] for image, j in pairs]
        regions = self.spec.feature_shape[0]
        rng = np.random.default_rng([cfg.seed, self.plan.epoch, _REGION_STREAM, self.rank, slot, made])
        orders = [_region_index(image.boxes, regions, cfg.region_order, rng) for image in images]
        pool_rows = np.fromiter((image.row for image in images), dtype=np.int64, count=len(images))
        reordered = cfg.region_order != "stored"
        index_rows = (pool_rows[:, None] * regions + np.stack(orders)).reshape(-1) if reordered else pool_rows
        boxes = None
        if all(image.boxes is not None for image in images):
            boxes = np.stack([image.boxes if order is None else image.boxes[order]  # type: ignore[index]
                              for image, order in zip(images, orders)]).astype(np.float32, copy=False)
        tokens, lengths = _tokens(self.tokenize, captions, keys)
        return _TrainPart(
            index_rows=index_rows, reordered=reordered, boxes=boxes, tokens=tokens, lengths=lengths,
            image_ids=np.fromiter((image.index for image in images), dtype=np.int64, count=len(images)),
            caption_index=np.fromiter((j for _, j in pairs), dtype=np.int64, count=len(pairs)),
            keys=keys, captions=captions, epoch=self.plan.epoch,
            index=self.positions[slot][made], slot=slot, made=made, stats=stats,
            pool=None if rows is None else rows.tensor)


def _rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Explicit values, else RANK / WORLD_SIZE from the environment (Ray and torchrun set them)."""
    world = world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", "1"))
    rank = rank if rank is not None else int(os.environ.get("RANK", "0"))
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world}")
    return rank, world


def _make_loader(dataset: IterableDataset, config: ReaderConfig, pin_memory: bool) -> DataLoader:
    workers = config.num_workers
    return DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                      prefetch_factor=config.prefetch_factor if workers > 0 else None,
                      persistent_workers=False)


class TrainReader:
    """The training reader of one rank.

    >>> reader = TrainReader(ReaderConfig("s3://bucket/coco/train"), vocab.encode)  # rank from RANK/WORLD_SIZE
    >>> for batch in reader.epoch(epoch, start_batch=k): ...
    >>> metrics = reader.stats.as_dict()
    """

    def __init__(self, config: ReaderConfig, tokenize: Tokenize, *, rank: int | None = None,
                 world_size: int | None = None) -> None:
        self.config = config
        self.tokenize = tokenize
        self.rank, self.world_size = _rank_and_world(rank, world_size)
        self.spec = load_split(config)
        self.stats = ReaderStats()
        self._buffers = _BatchBuffers()

    def plan(self, epoch: int) -> EpochPlan:
        """The epoch's plan; the same on every rank."""
        return make_plan([s.samples for s in self.spec.shards], images=self.spec.images, captions=self.spec.captions,
                         world_size=self.world_size, slots_per_rank=self.config.slots,
                         batch_size=self.config.batch_size, seed=self.config.seed, epoch=epoch)

    def batches_per_epoch(self, epoch: int) -> int:
        return self.plan(epoch).batches_per_rank

    def dataset(self, epoch: int, start_batch: int = 0) -> TrainDataset:
        """The epoch's dataset for a DataLoader of config.num_workers workers; `epoch()` runs it and
        turns its parts into `TrainBatch`es."""
        plan = self.plan(epoch)
        log.info("epoch %d: %d shards over %d ranks x %d slots: %d batches of %d per rank (about %d pairs "
                 "left out this epoch), starting at batch %d", epoch, len(self.spec.shards), self.world_size,
                 plan.slots_per_rank, plan.batches_per_rank, plan.batch_size, plan.dropped_pairs, start_batch)
        return TrainDataset(self.spec, self.config, self.tokenize, plan, self.rank, start_batch)

    def epoch(self, epoch: int, start_batch: int = 0, pin_memory: bool = False) -> Iterator[TrainBatch]:
        """The rank's batches of `epoch` from `start_batch` on, adding their stats to `self.stats`.

        The regions of each batch are gathered here from the loader workers' pools: into pinned
        memory if `pin_memory` and CUDA is available, else into a buffer of this reader that is
        reused only once nothing holds the batch's regions any more (`_BatchBuffers`).
        """
        pin = pin_memory and torch.cuda.is_available()
        dtype = getattr(torch, _output_dtype(self.config, self.spec))
        source_dtype = np.dtype(self.spec.feature_dtype)
        pools: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # slot -> (features, gathered counter)
        for part in _make_loader(self.dataset(epoch, start_batch), self.config, pin_memory=False):
            if part.pool is not None:
                pools[part.slot] = _RowPool.layout(part.pool, self.spec.feature_shape, source_dtype)
            features, gathered = pools[part.slot]
            shape = (part.tokens.shape[0], *self.spec.feature_shape)
            # Pinned memory comes from torch's caching host allocator, which also knows about
            # copies to the GPU still in flight; plain memory from this reader's buffers.
            regions = torch.empty(shape, dtype=dtype, pin_memory=True) if pin else self._buffers.take(shape, dtype)
            _gather_regions(features, part.index_rows, part.reordered, regions, self._buffers)
            gathered[0] = part.made  # the worker may now reuse the rows this batch freed
            self.stats.add(part.stats)
            batch = TrainBatch(regions=regions, boxes=None if part.boxes is None else torch.from_numpy(part.boxes),
                               tokens=torch.from_numpy(part.tokens), lengths=torch.from_numpy(part.lengths),
                               image_ids=torch.from_numpy(part.image_ids),
                               caption_index=torch.from_numpy(part.caption_index), keys=part.keys,
                               captions=part.captions, epoch=part.epoch, index=part.index, slot=part.slot,
                               stats=part.stats)
            yield batch.pin_memory() if pin else batch


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------


class EvalDataset(IterableDataset):
    """Shard j is read by loader worker j % workers, in chunks of at most batch_size images; every
    shard ends with a chunk marked last_in_shard (possibly empty) so the reader can reorder."""

    def __init__(self, spec: SplitSpec, config: ReaderConfig, tokenize: Tokenize) -> None:
        super().__init__()
        self.spec, self.config, self.tokenize = spec, config, tokenize

    def __iter__(self) -> Iterator[EvalBatch]:
        worker_id, _ = _worker_slot(self.config.slots)
        source = _ShardSource(self.spec, self.config)
        for shard in self.spec.shards[worker_id :: self.config.slots]:
            chunk: list[ImageRecord] = []
            number = 0
            for record in source.records(shard):
                chunk.append(record)
                if len(chunk) == self.config.batch_size:
                    yield self._collate(chunk, shard, number, False, source.take_counts())
                    chunk, number = [], number + 1
            yield self._collate(chunk, shard, number, True, source.take_counts())

    def _collate(self, records: list[ImageRecord], shard: ShardRef, chunk: int, last: bool,
                 stats: dict[str, int]) -> EvalBatch:
        cfg = self.config
        captions = [caption for r in records for caption in r.captions]
        keys = [r.key for r in records for _ in r.captions]
        tokens, lengths, image_ids, caption_image_ids = _long_tensors(
            *_tokens(self.tokenize, captions, keys), [r.index for r in records],
            [r.index for r in records for _ in r.captions])
        if records:
            rngs = ([np.random.default_rng([cfg.seed, _REGION_STREAM, r.index]) for r in records]
                    if cfg.region_order == "random" else [None] * len(records))
            regions, boxes = _image_arrays(records, cfg.region_order, _output_dtype(cfg, self.spec), rngs)
        else:
            shape = (0, *self.spec.feature_shape)
            regions, boxes = torch.zeros(shape, dtype=getattr(torch, _output_dtype(cfg, self.spec))), None
        return EvalBatch(regions=regions, boxes=boxes, image_ids=image_ids,
                         keys=[r.key for r in records], captions=captions, tokens=tokens, lengths=lengths,
                         caption_image_ids=caption_image_ids, shard_position=shard.position, chunk=chunk,
                         last_in_shard=last, stats=stats)


class EvalReader:
    """Every image and caption of a split exactly once, in source order (meta index order).

    Iterating yields non-empty `EvalBatch`es in order, whatever `config.num_workers`: the workers
    read different shards and the batches are put back in order here. Concatenating `regions`
    (or the image embeddings) and `captions` over the batches gives images in index order and
    their captions image by image. Raises ShardFormatError if the indices are not strictly
    increasing, and under `strict` if fewer images than the manifest lists were read.
    """

    def __init__(self, config: ReaderConfig, tokenize: Tokenize) -> None:
        self.config = config
        self.tokenize = tokenize
        self.spec = load_split(config)
        self.stats = ReaderStats()

    @property
    def images(self) -> int:
        """Images in the selected shards, as the manifest counts them."""
        return sum(s.samples for s in self.spec.shards)

    def __iter__(self) -> Iterator[EvalBatch]:
        loader = _make_loader(EvalDataset(self.spec, self.config, self.tokenize), self.config, pin_memory=False)
        pending: dict[tuple[int, int], EvalBatch] = {}
        wanted = (0, 0)
        previous: int | None = None
        delivered = 0
        for batch in loader:
            self.stats.add(batch.stats)
            pending[(batch.shard_position, batch.chunk)] = batch
            while wanted in pending:
                batch = pending.pop(wanted)
                wanted = (wanted[0] + 1, 0) if batch.last_in_shard else (wanted[0], wanted[1] + 1)
                for image_id, key in zip(batch.image_ids.tolist(), batch.keys):
                    if previous is not None and image_id <= previous:
                        shard = self.spec.shards[batch.shard_position]
                        raise ShardFormatError(f"{shard.url}: sample {key} has index {image_id} after {previous}: "
                                               "the shards are not in source order")
                    previous = image_id
                delivered += len(batch.keys)
                if batch.keys:
                    yield batch
        if pending or wanted != (len(self.spec.shards), 0):
            raise RuntimeError(f"evaluation reader lost chunks: expected {wanted}, still holding {sorted(pending)}")
        if self.config.bad_data == "strict" and delivered != self.images:
            raise ShardFormatError(f"{self.spec.location}: read {delivered} images, the manifest lists {self.images}")
