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
- `shared_rows.RowPool` (rows reused only after the main process gathered the batches that used
  them) and `shared_rows.BatchBuffers` (batch memory reused only when nothing else holds it).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import itertools
import shutil
import subprocess
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_iterator

from data_shards.convert import TAR_MODE, TAR_MTIME, TAR_USER
from data_shards.format import ImageRecord, ShardFormatError, _all_finite, _load_npy, encode_record, sample_key
from data_shards.collate import eval_batch, tokenize_captions
from data_shards.plan import REGION_STREAM
from data_shards.reader import EvalReader, ReaderConfig, TrainBatch, TrainReader
from data_shards.shard_reader import ShardStream, shard_files
from data_shards.shared_rows import BatchBuffers, RowPool

# The shard helpers of test_reader.py (tests/ is on sys.path, where "data_shards" is the package,
# so the module is loaded by its path).
_spec = importlib.util.spec_from_file_location("_reader_test_helpers", Path(__file__).with_name("test_reader.py"))
assert _spec is not None and _spec.loader is not None
_helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_helpers)
REGIONS, boxes_for, caption, features = _helpers.REGIONS, _helpers.boxes_for, _helpers.caption, _helpers.features
tokenize, write_split = _helpers.tokenize, _helpers.write_split

URL = "shard.tar"

# --------------------------------------------------------------------------------------------------
# Tar reading
# --------------------------------------------------------------------------------------------------


def _samples_wds(data: bytes) -> tuple[list[dict[str, Any]], str | None]:
    """(samples, error type) the previous reader got: webdataset over tarfile's stream mode."""
    out: list[dict[str, Any]] = []
    files = ({**f, "__url__": URL} for f in tar_file_iterator(io.BytesIO(data)))
    try:
        for sample in group_by_keys(files):
            out.append({k: (bytes(v) if k not in ("__key__", "__url__") else v) for k, v in sample.items()})
    except Exception as exc:  # noqa: BLE001 - compared with the new path's
        return out, type(exc).__name__
    return out, None


class _ShortReads(io.RawIOBase):
    """A source that gives at most `chunk` bytes per read, as a network stream may."""

    def __init__(self, data: bytes, chunk: int) -> None:
        self._data, self._chunk, self._pos = data, chunk, 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        size = self._chunk if size is None or size < 0 else min(size, self._chunk)
        out = self._data[self._pos : self._pos + size]
        self._pos += len(out)
        return out


def _samples_new(data: bytes, buffer_size: int) -> tuple[list[dict[str, Any]], str | None, str | None]:
    """(samples, error type, sha256 of everything read) through ShardStream + shard_files, the
    source giving at most `buffer_size` bytes per read."""
    stream = ShardStream(_ShortReads(data, buffer_size), URL, hashing=True)  # type: ignore[arg-type]
    out: list[dict[str, Any]] = []
    try:
        for sample in group_by_keys(shard_files(stream, URL)):
            out.append({k: (bytes(v) if k not in ("__key__", "__url__") else v) for k, v in sample.items()})
    except Exception as exc:  # noqa: BLE001 - compared with webdataset's
        return out, type(exc).__name__, None
    stream.drain()
    return out, None, stream.hexdigest()


def _member(name: str, data: bytes, **fields: Any) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for key, value in fields.items():
        setattr(info, key, value)
    return info, data


def _tar(members: list[tuple[tarfile.TarInfo, bytes | None]], fmt: int = tarfile.PAX_FORMAT, **kwargs: Any) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt, **kwargs) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def _image_samples(count: int, start: int = 0) -> list[dict[str, Any]]:
    return [encode_record(ImageRecord(key=sample_key("train", i), regions=features(i), boxes=boxes_for(i),
                                      captions=[caption(i, j) for j in range(5)], split="train", index=i))
            for i in range(start, start + count)]


def _converter_tar(count: int = 6) -> bytes:
    """Headers as data_shards/convert.py writes them: plain ustar, no pax."""
    buffer = io.BytesIO()
    with wds.TarWriter(buffer, user=TAR_USER, group=TAR_USER, mode=TAR_MODE, mtime=TAR_MTIME, encoder=False) as w:
        for sample in _image_samples(count):
            w.write(sample)
    return buffer.getvalue()


def _pax_tar(count: int = 6) -> bytes:
    """webdataset's default TarWriter: a float mtime, hence a pax header before every member."""
    buffer = io.BytesIO()
    with wds.TarWriter(buffer, encoder=False) as w:
        for sample in _image_samples(count):
            w.write(sample)
    return buffer.getvalue()


def _mixed_tar(fmt: int) -> bytes:
    long_dir = "d" * 60 + "/" + "e" * 60  # > 100 characters: ustar prefix, GNU long name or pax path
    members: list[tuple[tarfile.TarInfo, bytes | None]] = [
        _member("a.txt", b"x" * 512),  # data exactly one block: no padding
        _member("a.json", b""),  # empty member
        _member("__meta__", b"webdataset skips"),  # meta files are skipped
        _member("__skip__/b.txt", b"skipped too"),
        _member("nodot", b"no extension: no key"),
        _member("dir", b"", type=tarfile.DIRTYPE),
        _member("link.txt", b"", type=tarfile.SYMTYPE, linkname="a.txt"),
        _member("b.TXT", b"upper-case suffix" * 100),
        _member("b.data.bin", bytes(range(256)) * 700),  # larger than the small buffers below
        _member(f"{long_dir}/c.txt", b"long path"),
        _member("c.npy", np.arange(7, dtype=np.float32).tobytes(), mtime=1.5),  # float mtime: pax under PAX
        _member("c.txt", "caf\u00e9".encode(), uname="\u00e9l\u00e8ve"),  # non-ASCII owner: pax under PAX
    ]
    return _tar(members, fmt=fmt)


TARS: dict[str, Callable[[], bytes]] = {
    "converter": _converter_tar,
    "pax": _pax_tar,
    "mixed_pax": lambda: _mixed_tar(tarfile.PAX_FORMAT),
    "mixed_gnu": lambda: _mixed_tar(tarfile.GNU_FORMAT),
    "mixed_ustar": lambda: _tar([m for m in [_member("x" * 90 + "/" + "y" * 60 + ".txt", b"prefix")]],
                                fmt=tarfile.USTAR_FORMAT),
    "global_pax": lambda: _tar([_member("a.txt", b"1"), _member("b.txt", b"2")], pax_headers={"comment": "hi"}),
    "gzip": lambda: gzip.compress(_converter_tar(3), mtime=0),
    "duplicate": lambda: _tar([_member("k.txt", b"1"), _member("k.txt", b"2")]),
    "empty_archive": lambda: _tar([]),
    "empty_file": lambda: b"",
    "not_a_tar": lambda: b"hello world" * 100,
}


@pytest.mark.parametrize("kind", sorted(TARS))
@pytest.mark.parametrize("buffer_size", [700, 4096, 1 << 20])
def test_tar_files_match_webdataset(kind: str, buffer_size: int) -> None:
    data = TARS[kind]()
    expected, error = _samples_wds(data)
    got, got_error, digest = _samples_new(data, buffer_size)
    assert got == expected and got_error == error
    if error is None:
        assert digest == hashlib.sha256(data).hexdigest()
    if kind in ("converter", "pax"):
        assert len(got) == 6 and error is None


@pytest.mark.skipif(shutil.which("tar") is None, reason="needs GNU tar to write sparse members")
@pytest.mark.parametrize("fmt", ["gnu", "posix"])
def test_sparse_members_match_webdataset(tmp_path: Path, fmt: str) -> None:
    # tarfile cannot write sparse members; GNU tar can (old GNU 'S' headers, or pax GNU.sparse).
    with open(tmp_path / "a.bin", "wb") as f:
        f.write(b"head")
        f.seek(300_000)
        f.write(b"tail")
    (tmp_path / "a.txt").write_bytes(b"after the sparse member")
    subprocess.run(["tar", "--sparse", f"--format={fmt}", "-cf", "out.tar", "a.bin", "a.txt"], cwd=tmp_path,
                   check=True)
    data = (tmp_path / "out.tar").read_bytes()
    expected, error = _samples_wds(data)
    assert error is None and expected[0]["bin"] == b"head" + bytes(300_000 - 4) + b"tail"
    for buffer_size in (700, 1 << 20):
        got, got_error, digest = _samples_new(data, buffer_size)
        assert (got, got_error) == (expected, None) and digest == hashlib.sha256(data).hexdigest()


def _cut_points(data: bytes) -> Iterator[int]:
    """Every block boundary, and a few points inside each block, of a small tar."""
    for block in range(len(data) // 512 + 1):
        for offset in (0, 1, 100, 148, 156, 257, 511):
            if block * 512 + offset <= len(data):
                yield block * 512 + offset


@pytest.mark.parametrize("kind", ["converter", "pax", "mixed_gnu"])
def test_truncation_anywhere_gives_the_same_samples_and_error(kind: str) -> None:
    data = {"converter": _converter_tar, "pax": _pax_tar}[kind](2) if kind != "mixed_gnu" else TARS[kind]()
    for cut in _cut_points(data):
        expected, error = _samples_wds(data[:cut])
        got, got_error, _ = _samples_new(data[:cut], 1024)
        assert (got, got_error) == (expected, error), f"cut at {cut}"


def _headers(data: bytes) -> list[int]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return [m.offset for m in tar.getmembers()]


def _damage(data: bytes, offset: int, field: slice, value: bytes, fix_checksum: bool) -> bytes:
    out = bytearray(data)
    out[offset + field.start : offset + field.start + len(value)] = value
    if fix_checksum:
        block = out[offset : offset + 512]
        block[148:156] = b" " * 8
        out[offset + 148 : offset + 156] = b"%06o\0 " % sum(block)
    return bytes(out)


DAMAGES = {  # (field, bytes written, recompute the header checksum)
    "checksum": (slice(148, 156), b"0000000\0", False),
    "name": (slice(0, 100), b"zz", False),
    "size_not_octal": (slice(124, 136), b"00000000z19\0", True),
    "size_base256": (slice(124, 136), b"\x80" + b"\0" * 10 + b"\x10", True),
    "mtime_junk": (slice(136, 148), b"junk", True),
    "mode_tab": (slice(100, 108), b"\t000444\0", True),
    "type_directory": (slice(156, 157), b"5", True),
    "type_unknown": (slice(156, 157), b"Z", True),
    "prefix": (slice(345, 350), b"dir", True),
    "signed_checksum": (slice(0, 1), b"\xf0", False),  # fixed below with tarfile's signed sum
    "all_zero": (slice(0, 512), b"\0" * 512, False),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
@pytest.mark.parametrize("member", [0, 1, 4])
def test_damaged_header_gives_the_same_samples_and_error(damage: str, member: int) -> None:
    data = _converter_tar(2)
    offset = _headers(data)[member]
    field, value, fix = DAMAGES[damage]
    damaged = _damage(data, offset, field, value, fix)
    if damage == "signed_checksum":  # a writer that summed signed bytes: tarfile accepts it
        block = bytearray(damaged[offset : offset + 512])
        signed = 256 + sum(b - 256 if b > 127 else b for i, b in enumerate(block) if not 148 <= i < 156)
        damaged = damaged[: offset + 148] + b"%06o\0 " % signed + damaged[offset + 156 :]
    expected, error = _samples_wds(damaged)
    got, got_error, _ = _samples_new(damaged, 1024)
    assert (got, got_error) == (expected, error)


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


def test_batch_buffers_are_reused_only_when_nobody_holds_them() -> None:
    buffers = BatchBuffers(keep=2)
    first = buffers.take((2, 3), torch.float32)
    first.fill_(1.0)
    second = buffers.take((2, 3), torch.float32)  # `first` is held: new memory
    assert second.data_ptr() != first.data_ptr()
    weight = torch.ones(3, requires_grad=True)
    loss = (first * weight).sum()  # autograd keeps `first` for the backward pass
    held_by_autograd = first.data_ptr()
    del first, second
    third = buffers.take((2, 3), torch.float32)
    assert third.data_ptr() != held_by_autograd  # the saved tensor is not handed out again
    del third
    loss.backward()
    del loss
    assert buffers.take((2, 3), torch.float32).data_ptr() in {b.ctypes.data for b in buffers.buffers}
    assert buffers.take((5,), torch.float16).shape == (5,)  # another shape: its own buffer


def test_row_pool_reuses_a_row_only_after_its_batch_was_gathered() -> None:
    pool = RowPool(rows=2, feature_shape=(2, 3), dtype=np.dtype(np.float16), gathered=-1)
    image = np.arange(6, dtype=np.float16).reshape(2, 3)
    a, b = pool.put(image), pool.put(image + 1)
    assert {a, b} == {0, 1} and np.array_equal(pool.features()[b], image + 1)
    pool.release(a, made=0)
    pool.release(b, made=1)
    gathered = []

    def main_process() -> None:  # gathers batch 0 a little later, from another thread
        time.sleep(0.2)
        gathered.append(time.perf_counter())
        pool.mark_gathered(0)

    thread = threading.Thread(target=main_process)
    thread.start()
    assert pool.put(image + 2) == a  # waits for batch 0, then reuses its row, not batch 1's
    assert gathered and time.perf_counter() >= gathered[0]
    thread.join()
    assert np.array_equal(pool.features()[a], image + 2) and np.array_equal(pool.features()[b], image + 1)
    pool.mark_gathered(1)
    assert pool.put(image) == b
    pool.close()
