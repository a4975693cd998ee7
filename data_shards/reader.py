"""Read sharded splits (data_shards/format.py) for training and evaluation.

Two readers share one reading engine, composed of small stages, one module each:

    split.py         the manifest and the shard selection (`SplitSpec`, main process)
    plan.py          the epoch plan: which shards each (rank, loader worker) reads, how many batches
    shard_reader.py  one shard: open, hash while streaming, tar members, samples, checks, bad-data policy
    caption_pool.py  the per-worker shuffle: batches of distinct images' captions
    shared_rows.py   image features in shared memory, gathered into reused batch buffers
    regions.py       the region orders
    collate.py       tokens and batch assembly
    batches.py       TrainBatch / EvalBatch (what the readers give)

and this module, which assembles them with a torch DataLoader:

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
numbers (small arrays, by value through the DataLoader's pipe). The main process creates the
pools (multiprocessing.shared_memory) when the epoch starts and gathers each batch's regions from
them (`np.take`, one thread) into memory that it reuses once the caller has let go of a batch
(`BatchBuffers`), or into pinned memory (`pin_memory=True` on a CUDA machine). Rows are recycled
only after the main process has gathered every batch that used them (a semaphore counts the
gathered batches; data_shards/shared_rows.py).
Building each batch in a worker instead costs a fresh shared-memory block per batch, filled
through page faults, five times per image: that was the reader's largest cost
(docs/benchmarks.md). `output_dtype="float16"` halves the bytes per batch; `"stored"` skips any
conversion (the model casts, on its device). The evaluation reader, which uses each image once,
builds its batches in the workers; torch's DataLoader moves them into shared memory.

Memory
------
Per training worker: its pool in shared memory, at most pool_images + 2 x batch_size rows of
one image's features (1280 x 147 KB for batches of 128, float16), mapped by the worker and the
main process, which touch only the rows in use (freed rows are reused first); plus the main
process's few batch buffers. Independent of the dataset size. The evaluation reader holds chunks
that arrive ahead of their turn: at most about one shard's worth per worker.

Region order (paper Table 5): "stored" (detector confidence), "area" (descending box area, stable,
data_shards/regions.py; needs boxes), "random" (a fresh permutation per pair and epoch;
evaluation: per image, seeded by (seed, image index)). Reordering here or in the model, not both.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_shards.batches import EvalBatch, TrainBatch, TrainPart
from data_shards.caption_pool import CaptionPool, PooledImage
from data_shards.collate import PAD_ID, Tokenize, eval_batch, train_part
from data_shards.format import ImageRecord, ShardFormatError
from data_shards.plan import POOL_STREAM, REGION_STREAM, EpochPlan, make_plan
from data_shards.regions import REGION_ORDERS, RegionOrder
from data_shards.shard_reader import BAD_DATA_POLICIES, CHECKSUM_MODES, BadDataPolicy, ChecksumMode, ShardReader
from data_shards.shared_rows import BatchBuffers, RowPool, gather_regions
from data_shards.split import ShardRef, SplitSpec, read_split

__all__ = ["PAD_ID", "EvalBatch", "EvalReader", "EpochPlan", "ReaderConfig", "ReaderStats", "RegionOrder",
           "ShardRef", "SplitSpec", "Tokenize", "TrainBatch", "TrainReader", "load_split", "make_plan"]

log = logging.getLogger(__name__)


@dataclass
class ReaderConfig:
    """Everything a reader needs besides the tokenizer and the rank."""

    location: str  # split directory with manifest.json: local path, file:// or s3://bucket/prefix
    shards: str | Sequence[str] | None = None  # names or brace patterns selecting shards; None: all
    batch_size: int = 128  # training: (image, caption) pairs per batch per rank; evaluation: images
    num_workers: int = 2  # DataLoader workers per rank (0: read in the calling process)
    seed: int = 0
    pool_images: int | None = None  # images in each worker's caption pool; None: 8 x batch_size
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
        choices = {"region_order": REGION_ORDERS, "bad_data": BAD_DATA_POLICIES,
                   "checksums": CHECKSUM_MODES, "output_dtype": ("float32", "float16", "stored")}
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


def load_split(config: ReaderConfig) -> SplitSpec:
    """The split `config` selects: its manifest read and its shard selection resolved."""
    return read_split(config.location, config.shards, config.storage_options)


def _shard_reader(spec: SplitSpec, config: ReaderConfig) -> ShardReader:
    return ShardReader(spec, bad_data=config.bad_data, checksums=config.checksums,
                       need_boxes=config.region_order == "area", spool_bytes=config.spool_bytes)


def _output_dtype(config: ReaderConfig, spec: SplitSpec) -> torch.dtype:
    """The dtype of the regions a reader gives."""
    return getattr(torch, spec.feature_dtype if config.output_dtype == "stored" else config.output_dtype)


def _worker_slot(slots: int, offset: int = 0) -> tuple[int, int]:
    """(this process's loader worker id, the slot it plays); checks the worker count."""
    info = get_worker_info()
    workers, worker_id = (info.num_workers, info.id) if info is not None else (1, 0)
    if workers != slots:
        raise RuntimeError(f"the reader was planned for {slots} reading slot(s) (ReaderConfig.num_workers) but the "
                           f"DataLoader has {workers} worker(s); read through TrainReader.epoch/EvalReader")
    return worker_id, (worker_id + offset) % slots


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


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


def _pooled_images(source: ShardReader, shards: Sequence[ShardRef], rows: RowPool, topup: bool,
                   tally: list[int]) -> Iterator[PooledImage]:
    """Stage: one pass over a slot's shards, each image's features put into `rows`; `tally[0]`
    counts the images it gave."""
    for shard in shards:
        for record in source.records(shard):
            tally[0] += 1
            if topup:
                source.counts["topup_images"] += 1
            yield PooledImage(key=record.key, captions=record.captions, index=record.index, boxes=record.boxes,
                              row=rows.put(record.regions))


class TrainDataset(IterableDataset):
    """One rank's epoch as an IterableDataset of batch parts (`TrainPart`: a batch without its
    regions, which `TrainReader.epoch` gathers from the slot's `RowPool`, `pools[slot]`)."""

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
        # Rows for the caption pool's images (no more than the slot reads), plus those of images
        # that left it in batches the main process may not have gathered yet: about batch_size / 5
        # per batch in flight (an image leaves with its fifth caption), up to batch_size in a
        # slot's last batches. Two batches' worth keeps the worker from waiting in practice; it
        # would only wait, never deadlock, with fewer (see shared_rows.py).
        self.pools: list[RowPool] = []
        for slot in range(plan.slots_per_rank):
            done = self.skips[slot] >= plan.batches[rank][slot]
            slot_images = sum(spec.shards[p].samples for p in plan.shards[rank][slot])
            rows = 0 if done else min(config.pool_size, slot_images) + 2 * config.batch_size
            self.pools.append(RowPool(rows, spec.feature_shape, np.dtype(spec.feature_dtype),
                                      gathered=self.skips[slot] - 1, shared=config.num_workers > 0))

    def close(self) -> None:
        """Free the pools' memory (the main process, once the epoch is over)."""
        for pool in self.pools:
            pool.close()

    def __len__(self) -> int:
        return self.plan.batches_per_rank - self.start_batch

    def __iter__(self) -> Iterator[TrainPart]:
        _, slot = _worker_slot(self.plan.slots_per_rank, self.slot_offset)
        target, skip = self.plan.batches[self.rank][slot], self.skips[slot]
        if skip >= target:
            return
        cfg, epoch = self.config, self.plan.epoch
        shards = [self.spec.shards[p] for p in self.plan.shards[self.rank][slot]]
        source = _shard_reader(self.spec, cfg)
        rows = self.pools[slot]
        made = 0
        pool = CaptionPool(cfg.pool_size, cfg.batch_size, np.random.default_rng([cfg.seed, epoch, POOL_STREAM,
                                                                                  self.rank, slot]),
                           on_leave=lambda image: rows.release(image.row, made))
        for reading in itertools.count():  # pass 0 is the epoch; later passes top up a short slot
            if reading == 1:
                log.warning("epoch %d rank %d slot %d: its shards gave only %d of %d batches; topping up with "
                            "another pass (counted in topup_images)", epoch, self.rank, slot, made, target)
            tally = [0]
            images = _pooled_images(source, shards, rows, topup=reading > 0, tally=tally)
            batches = pool.batches(images)
            try:
                for pairs in batches:
                    if made >= skip:
                        yield train_part(
                            pairs, tokenize=self.tokenize, regions=self.spec.feature_shape[0], order=cfg.region_order,
                            rng=np.random.default_rng([cfg.seed, epoch, REGION_STREAM, self.rank, slot, made]),
                            epoch=epoch, index=self.positions[slot][made], slot=slot, made=made,
                            stats=source.take_counts())
                    made += 1
                    if made == target:
                        return
            finally:
                batches.close()
                images.close()
            if tally[0] == 0:
                raise ShardFormatError(f"epoch {epoch} rank {self.rank} slot {slot}: no readable image left in its "
                                       f"shards ({[s.name for s in shards]}) to make batch {made} of {target}")


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
        self._buffers = BatchBuffers()

    def plan(self, epoch: int) -> EpochPlan:
        """The epoch's plan; the same on every rank."""
        return make_plan([s.samples for s in self.spec.shards], images=self.spec.images, captions=self.spec.captions,
                         world_size=self.world_size, slots_per_rank=self.config.slots,
                         batch_size=self.config.batch_size, seed=self.config.seed, epoch=epoch)

    def batches_per_epoch(self, epoch: int) -> int:
        return self.plan(epoch).batches_per_rank

    def dataset(self, epoch: int, start_batch: int = 0) -> TrainDataset:
        """The epoch's dataset for a DataLoader of config.num_workers workers; `epoch()` runs it and
        turns its parts into `TrainBatch`es (and frees its pools: a caller of `dataset` itself
        calls its `close()`)."""
        plan = self.plan(epoch)
        log.info("epoch %d: %d shards over %d ranks x %d slots: %d batches of %d per rank (about %d pairs "
                 "left out this epoch), starting at batch %d", epoch, len(self.spec.shards), self.world_size,
                 plan.slots_per_rank, plan.batches_per_rank, plan.batch_size, plan.dropped_pairs, start_batch)
        return TrainDataset(self.spec, self.config, self.tokenize, plan, self.rank, start_batch)

    def epoch(self, epoch: int, start_batch: int = 0, pin_memory: bool = False) -> Iterator[TrainBatch]:
        """The rank's batches of `epoch` from `start_batch` on, adding their stats to `self.stats`.

        The regions of each batch are gathered here from the loader workers' pools: into pinned
        memory if `pin_memory` and CUDA is available, else into a buffer of this reader that is
        reused only once nothing holds the batch's regions any more (`BatchBuffers`).
        """
        pin = pin_memory and torch.cuda.is_available()
        dtype = _output_dtype(self.config, self.spec)
        dataset = self.dataset(epoch, start_batch)
        try:
            for part in _make_loader(dataset, self.config, pin_memory=False):
                pool = dataset.pools[part.slot]
                shape = (part.tokens.shape[0], *self.spec.feature_shape)
                # Pinned memory comes from torch's caching host allocator, which also knows about
                # copies to the GPU still in flight; plain memory from this reader's buffers.
                regions = torch.empty(shape, dtype=dtype, pin_memory=True) if pin else self._buffers.take(shape, dtype)
                gather_regions(pool.features(), part.index_rows, part.reordered, regions, self._buffers)
                pool.mark_gathered(part.made)  # the worker may now reuse the rows this batch freed
                self.stats.add(part.stats)
                batch = TrainBatch(regions=regions, boxes=None if part.boxes is None else torch.from_numpy(part.boxes),
                                   tokens=torch.from_numpy(part.tokens), lengths=torch.from_numpy(part.lengths),
                                   image_ids=torch.from_numpy(part.image_ids),
                                   caption_index=torch.from_numpy(part.caption_index), keys=part.keys,
                                   captions=part.captions, epoch=part.epoch, index=part.index, slot=part.slot,
                                   stats=part.stats)
                yield batch.pin_memory() if pin else batch
        finally:
            dataset.close()


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------


def _chunks(source: ShardReader, shard: ShardRef, size: int) -> Iterator[tuple[list[ImageRecord], int, bool]]:
    """Stage: a shard's records in chunks of at most `size` (number, last), ending with a chunk
    marked last (possibly empty) so the reader can put the shards back in order."""
    chunk: list[ImageRecord] = []
    number = 0
    for record in source.records(shard):
        chunk.append(record)
        if len(chunk) == size:
            yield chunk, number, False
            chunk, number = [], number + 1
    yield chunk, number, True


class EvalDataset(IterableDataset):
    """Shard j is read by loader worker j % workers, in chunks of at most batch_size images; every
    shard ends with a chunk marked last_in_shard (possibly empty) so the reader can reorder."""

    def __init__(self, spec: SplitSpec, config: ReaderConfig, tokenize: Tokenize) -> None:
        super().__init__()
        self.spec, self.config, self.tokenize = spec, config, tokenize

    def __iter__(self) -> Iterator[EvalBatch]:
        worker_id, _ = _worker_slot(self.config.slots)
        cfg = self.config
        source = _shard_reader(self.spec, cfg)
        dtype = _output_dtype(cfg, self.spec)
        for shard in self.spec.shards[worker_id :: cfg.slots]:
            for records, number, last in _chunks(source, shard, cfg.batch_size):
                rngs = ([np.random.default_rng([cfg.seed, REGION_STREAM, r.index]) for r in records]
                        if cfg.region_order == "random" else [None] * len(records))
                yield eval_batch(records, tokenize=self.tokenize, feature_shape=self.spec.feature_shape, dtype=dtype,
                                 order=cfg.region_order, rngs=rngs, shard_position=shard.position, chunk=number,
                                 last=last, stats=source.take_counts())


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
