"""The reader's stages against the straightforward implementations they replace.

- `shard_reader.shard_files` (tarfile's stream mode over a hashing `ShardStream`, webdataset's
  file filter) against webdataset's tar_file_iterator: the same samples, bytes and sha256 for many
  tar dialects and read sizes, and the same samples and error type for every truncation and for
  damaged headers.
- `format._load_npy` (cached headers, data used in place) against np.load.
- `format._all_finite` (exponent bits) against np.isfinite.
- `collate.tokenize_captions` (one numpy assignment) against the row-by-row padding it replaced.
- `collate.eval_batch` and whole batches from loader workers against reference batches built in
  the test from the known features, boxes and captions, including pools small enough that every
  row is recycled many times, and consumers that hold on to their batches.
(The tar reading is compared with webdataset's in test_shard_reader.py, the shared-memory rows and
buffers tested in test_shared_rows.py.)
"""

from __future__ import annotations

import io
import itertools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from shard_test_helpers import REGIONS, boxes_for, caption, features, tokenize, write_split

from data_shards.collate import eval_batch, tokenize_captions
from data_shards.format import ImageRecord, ShardFormatError, _all_finite, _load_npy
from data_shards.plan import REGION_STREAM
from data_shards.reader import EvalReader, ReaderConfig, TrainBatch, TrainReader


# --------------------------------------------------------------------------------------------------
# .npy decoding, finiteness, tokens
# --------------------------------------------------------------------------------------------------


def _npy(array: np.ndarray, version: tuple[int, int] | None = None) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array, version=version, allow_pickle=array.dtype.hasobject)
    return buffer.getvalue()


ARRAYS = {
    "float16": np.random.default_rng(0).standard_normal((36, 64)).astype(np.float16),
    "float32": np.random.default_rng(1).standard_normal((5, 4)).astype(np.float32),
    "fortran": np.asfortranarray(np.arange(12, dtype=np.float32).reshape(3, 4)),
    "big_endian": np.arange(6, dtype=">f2").reshape(2, 3),
    "scalar": np.array(3.5, dtype=np.float64),
    "empty": np.zeros((0, 8), dtype=np.float16),
    "int": np.arange(10, dtype=np.int64),
    "structured": np.zeros(3, dtype=[("a", "<i4"), ("b", "<f2")]),
}


@pytest.mark.parametrize("name", sorted(ARRAYS))
@pytest.mark.parametrize("version", [None, (2, 0)])
@pytest.mark.parametrize("container", ["bytes", "bytearray", "memoryview"])
def test_load_npy_equals_np_load(name: str, version: tuple[int, int] | None, container: str) -> None:
    raw = _npy(ARRAYS[name], version)
    data: Any = {"bytes": raw, "bytearray": bytearray(raw), "memoryview": memoryview(bytearray(raw))}[container]
    expected = np.load(io.BytesIO(raw), allow_pickle=False)
    for _ in range(2):  # the second time from the header cache
        got = _load_npy(data, "here")
        assert got.dtype == expected.dtype and got.shape == expected.shape and got.flags.writeable
        assert got.tobytes() == expected.tobytes() and got.flags.f_contiguous == expected.flags.f_contiguous
    if container == "bytes":
        assert not np.shares_memory(got, np.frombuffer(raw, np.uint8))


@pytest.mark.parametrize("data", [
    _npy(ARRAYS["float16"])[:-1],  # one byte short
    _npy(ARRAYS["float16"])[:60],  # inside the header
    b"\x93NUMPY\x01\x00\xff\xff{'descr': '<f2'",  # header longer than the data
    _npy(np.array(["a", None], dtype=object)),  # objects: np.load refuses without pickle
    b"\x93NUMPY\x09\x00" + _npy(ARRAYS["float32"])[8:],  # unknown version
], ids=["short_data", "short_header", "header_length", "object", "version"])
def test_load_npy_errors_as_np_load(data: bytes) -> None:
    with pytest.raises(Exception) as expected:
        np.load(io.BytesIO(data), allow_pickle=False)
    with pytest.raises(ShardFormatError, match="here: unreadable .npy") as got:
        _load_npy(data, "here")
    assert str(expected.value) in str(got.value)


def test_all_finite_equals_isfinite() -> None:
    every_half = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    finite = every_half[np.isfinite(every_half)]
    assert _all_finite(finite) and _all_finite(finite[::-1].copy()) and _all_finite(finite[::7])  # strided too
    for bad in every_half[~np.isfinite(every_half)]:  # each Inf and NaN bit pattern, either sign
        values = features(0).copy()
        values[3, 5] = bad
        assert not _all_finite(values) and not _all_finite(np.asfortranarray(values))
    assert _all_finite(np.zeros((0, 4), np.float16))
    assert not _all_finite(np.array([1, np.inf], dtype=">f2")) and _all_finite(np.array([1, 2], dtype=">f2"))
    assert not _all_finite(np.array([1, np.nan], dtype=np.float32)) and _all_finite(np.ones(3, np.float32))


def _tokens_reference(tokenize: Callable[[str], list[int]], captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The row-by-row padding _tokens replaced."""
    ids = [tokenize(c) for c in captions]
    lengths = torch.tensor([len(s) for s in ids], dtype=torch.long)
    tokens = torch.full((len(ids), int(lengths.max()) if ids else 0), 0, dtype=torch.long)
    for row, sequence in enumerate(ids):
        tokens[row, : len(sequence)] = torch.as_tensor(sequence, dtype=torch.long)
    return tokens, lengths


@pytest.mark.parametrize("captions", [[], ["a"], ["one two three", "x", "a b c d e f g", "y z"]])
def test_tokens_equal_row_by_row_padding(captions: list[str]) -> None:
    tokens, lengths = tokenize_captions(tokenize, captions, ["key"] * len(captions))
    expected_tokens, expected_lengths = _tokens_reference(tokenize, captions)
    assert tokens.dtype == np.int64 and lengths.dtype == np.int64
    assert torch.equal(torch.from_numpy(tokens), expected_tokens)
    assert torch.equal(torch.from_numpy(lengths), expected_lengths)


def test_tokens_refuse_an_empty_sequence() -> None:
    with pytest.raises(ValueError, match=r"tokenize returned no tokens for caption 'b' of sample k2"):
        tokenize_captions(lambda c: [] if c == "b" else [1, 2], ["a", "b"], ["k1", "k2"])


# --------------------------------------------------------------------------------------------------
# Batches in shared memory
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("rows", [1, 16, 37])
def test_eval_batch_regions_equal_stacking(dtype: torch.dtype, rows: int) -> None:
    arrays = [features(i) for i in range(rows)]
    arrays[0] = np.asfortranarray(arrays[0])  # a non-contiguous row is written right too
    records = [ImageRecord(key=f"k{i}", regions=a, captions=["a b"], split="train", index=i)
               for i, a in enumerate(arrays)]
    batch = eval_batch(records, tokenize=tokenize, feature_shape=arrays[0].shape, dtype=dtype, order="stored",
                       rngs=[None] * rows, shard_position=0, chunk=0, last=True, stats={})
    tensor = batch.regions
    assert tensor.dtype == dtype and tensor.shape == (rows, *arrays[0].shape)
    assert torch.equal(tensor, torch.from_numpy(np.stack(arrays)).to(dtype))


def test_eval_batches_from_a_loader_worker_arrive_in_shared_memory(tmp_path: Path) -> None:
    write_split(tmp_path, [3, 2])
    batches = list(EvalReader(ReaderConfig(str(tmp_path), batch_size=2, num_workers=1), tokenize))
    assert len(batches) == 3 and all(b.regions.is_shared() and b.tokens.is_shared() for b in batches)


def _made_in_slot(batches: list[TrainBatch]) -> list[int]:
    """For each batch, how many batches its slot had made before it (the `made` of its region rng)."""
    counters: dict[int, Iterator[int]] = {}
    return [next(counters.setdefault(b.slot, itertools.count())) for b in batches]


def _expected_rows(batch: TrainBatch, order: str, made: int, seed: int, epoch: int) -> np.ndarray:
    """The batch's regions as the reference would build them: each image's stored features,
    reordered by area or by the (seed, epoch, rank 0, slot, made) generator, one draw per row."""
    rng = np.random.default_rng([seed, epoch, REGION_STREAM, 0, batch.slot, made])
    rows = []
    for image in batch.image_ids.tolist():
        values, box = features(image), boxes_for(image)
        if order == "area":
            values = values[np.argsort(-(box[:, 2] - box[:, 0]) * (box[:, 3] - box[:, 1]), kind="stable")]
        elif order == "random":
            values = values[rng.permutation(REGIONS)]
        rows.append(values)
    return np.stack(rows)


@pytest.mark.parametrize("order", ["stored", "area", "random"])
@pytest.mark.parametrize("output_dtype", ["float16", "float32"])
def test_worker_batches_equal_the_reference(tmp_path: Path, order: str, output_dtype: str) -> None:
    write_split(tmp_path, [7, 5, 6, 4])
    config = ReaderConfig(str(tmp_path), batch_size=4, num_workers=2, region_order=order,  # type: ignore[arg-type]
                          output_dtype=output_dtype, seed=3)  # type: ignore[arg-type]
    reader = TrainReader(config, tokenize, rank=0, world_size=1)
    batches = list(reader.epoch(2))
    assert len(batches) == reader.batches_per_epoch(2) > 20
    for batch, made in zip(batches, _made_in_slot(batches)):
        expected = torch.from_numpy(_expected_rows(batch, order, made, seed=3, epoch=2)).to(getattr(torch, output_dtype))
        assert batch.regions.dtype == expected.dtype and torch.equal(batch.regions, expected)
        assert batch.captions == [caption(i, j) for i, j in zip(batch.image_ids.tolist(), batch.caption_index.tolist())]
        tokens, lengths = _tokens_reference(tokenize, batch.captions)
        assert torch.equal(batch.tokens, tokens) and torch.equal(batch.lengths, lengths)
        assert batch.boxes is not None and batch.boxes.shape == (4, REGIONS, 4)


@pytest.mark.parametrize("order", ["stored", "random"])
@pytest.mark.parametrize("output_dtype", ["float16", "float32", "stored"])
def test_recycled_pool_rows_and_buffers_give_the_reference_batches(tmp_path: Path, order: str,
                                                                   output_dtype: str) -> None:
    # pool_images = batch size: each worker's pool has 4 + 4 x (2 + 2) = 20 rows for its ~60
    # images, so rows are reused several times; batches are compared as they arrive (their
    # buffers are then reused) and again at the end (the kept ones must be intact).
    write_split(tmp_path, [30, 31, 29, 30])
    config = ReaderConfig(str(tmp_path), batch_size=4, num_workers=2, region_order=order,  # type: ignore[arg-type]
                          output_dtype=output_dtype, seed=5, pool_images=4)  # type: ignore[arg-type]
    reader = TrainReader(config, tokenize, rank=0, world_size=1)
    dtype = torch.float16 if output_dtype in ("float16", "stored") else torch.float32
    kept: list[tuple[TrainBatch, torch.Tensor]] = []
    made: dict[int, int] = {}
    storages = set()
    for batch in reader.epoch(1):
        count = made.get(batch.slot, 0)
        made[batch.slot] = count + 1
        expected = torch.from_numpy(_expected_rows(batch, order, count, seed=5, epoch=1)).to(dtype)
        assert batch.regions.dtype == dtype and torch.equal(batch.regions, expected)
        storages.add(batch.regions.untyped_storage().data_ptr())
        if batch.index % 7 == 0:
            kept.append((batch, expected))
    assert sum(made.values()) == reader.batches_per_epoch(1) > 50
    assert len(storages) <= len(kept) + 6  # buffers were reused, except those of the kept batches
    for batch, expected in kept:  # held batches were never overwritten
        assert torch.equal(batch.regions, expected)


