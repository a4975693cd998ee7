"""data_shards/shard_reader.py: `shard_files` (tarfile's stream mode over a hashing
`ShardStream`, webdataset's file filter) against webdataset's own tar_file_iterator: the same
samples, bytes and sha256 for many tar dialects and read sizes, and the same samples and error
type for every truncation and for damaged headers."""

from __future__ import annotations

import gzip
import hashlib
import io
import shutil
import subprocess
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_iterator

from shard_test_helpers import boxes_for, caption, features

from data_shards.convert import TAR_MODE, TAR_MTIME, TAR_USER
from data_shards.format import ImageRecord, encode_record, sample_key
from data_shards.shard_reader import ShardStream, shard_files


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


