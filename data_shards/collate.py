"""Collation: turning checked records into what the readers send (data_shards/batches.py).

* `tokenize_captions`: captions to padded int64 token arrays.
* `train_part`: one training batch from the caption pool's (image, caption) pairs, its regions as
  row numbers of the slot's `RowPool` (the main process gathers them).
* `eval_batch`: the images of one chunk of one shard with all their captions; its tensors are
  built here, in the loader worker, and moved to shared memory by torch's DataLoader.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import numpy as np
import torch

from data_shards.batches import EvalBatch, TrainPart
from data_shards.caption_pool import PooledImage
from data_shards.format import ImageRecord
from data_shards.regions import RegionOrder, region_index

Tokenize = Callable[[str], list[int]]
PAD_ID = 0


def tokenize_captions(tokenize: Tokenize, captions: Sequence[str], keys: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Tokenize and pad with 0: (tokens (C, T) int64, lengths (C,) int64), as numpy arrays.

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


def train_part(pairs: Sequence[tuple[PooledImage, int]], *, tokenize: Tokenize, regions: int, order: RegionOrder,
               rng: np.random.Generator, epoch: int, index: int, slot: int, made: int,
               stats: dict[str, int]) -> TrainPart:
    """A training batch of (pooled image, caption number) pairs; `rng` draws the random orders."""
    images = [image for image, _ in pairs]
    keys = [image.key for image in images]
    captions = [image.captions[j] for image, j in pairs]
    orders = [region_index(image.boxes, regions, order, rng) for image in images]
    pool_rows = np.fromiter((image.row for image in images), dtype=np.int64, count=len(images))
    reordered = order != "stored"
    index_rows = (pool_rows[:, None] * regions + np.stack(orders)).reshape(-1) if reordered else pool_rows
    boxes = None
    if all(image.boxes is not None for image in images):
        boxes = np.stack([image.boxes if o is None else image.boxes[o]  # type: ignore[index]
                          for image, o in zip(images, orders)]).astype(np.float32, copy=False)
    tokens, lengths = tokenize_captions(tokenize, captions, keys)
    return TrainPart(
        index_rows=index_rows, reordered=reordered, boxes=boxes, tokens=tokens, lengths=lengths,
        image_ids=np.fromiter((image.index for image in images), dtype=np.int64, count=len(images)),
        caption_index=np.fromiter((j for _, j in pairs), dtype=np.int64, count=len(pairs)),
        keys=keys, captions=captions, epoch=epoch, index=index, slot=slot, made=made, stats=stats)


def _long_tensors(*arrays: np.ndarray | Sequence[int]) -> list[torch.Tensor]:
    """int64 tensors of `arrays`, all views of one storage: torch moves a batch's storages into
    shared memory one handshake each when a loader worker sends them; one block for the small
    tensors instead of one storage each saves those round trips."""
    values = [np.asarray(a, dtype=np.int64) for a in arrays]
    block = torch.empty(sum(v.size for v in values), dtype=torch.long)
    flat = block.numpy()
    tensors, offset = [], 0
    for v in values:
        flat[offset : offset + v.size] = v.reshape(-1)
        tensors.append(block[offset : offset + v.size].view(v.shape))
        offset += v.size
    return tensors


def _image_arrays(records: Sequence[ImageRecord], order: RegionOrder, dtype: torch.dtype,
                  rngs: Sequence[np.random.Generator | None]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Regions (N, R, D) in `dtype` and boxes (N, R, 4) float32 (None unless every image has
    boxes) of `records`, each row in `order` (random: row i draws from `rngs[i]`). Rows of
    another dtype are converted by torch, about twice as fast as numpy for float16 -> float32."""
    regions_per_image = records[0].regions.shape[0]
    indices = [region_index(r.boxes, regions_per_image, order, rng) for r, rng in zip(records, rngs)]
    rows = [r.regions if i is None else r.regions[i] for r, i in zip(records, indices)]
    stacked = np.stack(rows)
    regions = torch.from_numpy(stacked)
    if regions.dtype != dtype:
        regions = regions.to(dtype)
    boxes = None
    if all(r.boxes is not None for r in records):
        boxes = torch.from_numpy(np.stack([r.boxes if i is None else r.boxes[i]  # type: ignore[index]
                                           for r, i in zip(records, indices)]).astype(np.float32, copy=False))
    return regions, boxes


def eval_batch(records: list[ImageRecord], *, tokenize: Tokenize, feature_shape: tuple[int, int], dtype: torch.dtype,
               order: RegionOrder, rngs: Sequence[np.random.Generator | None], shard_position: int, chunk: int,
               last: bool, stats: dict[str, int]) -> EvalBatch:
    """The images of one chunk of one shard, with all their captions flattened in order."""
    captions = [caption for r in records for caption in r.captions]
    keys = [r.key for r in records for _ in r.captions]
    tokens, lengths, image_ids, caption_image_ids = _long_tensors(
        *tokenize_captions(tokenize, captions, keys), [r.index for r in records],
        [r.index for r in records for _ in r.captions])
    if records:
        regions, boxes = _image_arrays(records, order, dtype, rngs)
    else:
        regions, boxes = torch.zeros((0, *feature_shape), dtype=dtype), None
    caption_source_ids: list[str | None] = [
        caption_id for r in records
        for caption_id in (r.caption_ids if r.caption_ids is not None else [None] * len(r.captions))]
    return EvalBatch(regions=regions, boxes=boxes, image_ids=image_ids, keys=[r.key for r in records],
                     captions=captions, tokens=tokens, lengths=lengths, caption_image_ids=caption_image_ids,
                     shard_position=shard_position, chunk=chunk, last_in_shard=last, stats=stats,
                     source_ids=[r.source_id for r in records], caption_source_ids=caption_source_ids)
