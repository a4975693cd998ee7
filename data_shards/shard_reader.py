"""Reading one shard: open it, hash it while streaming, iterate its members and samples, check
each sample, apply the bad-data policy.

Every reader of shards goes through this module: the training and evaluation readers
(`ShardReader.records`, data_shards/reader.py), `verify.py` (`open_shard`, `tar_members`,
`sample_problems`) and the vocabulary builder of trainer/training/data.py (`shard_files`).

The stages, each a small generator over the previous one (webdataset's style):

    open_shard(url)            a `ShardStream`: the shard's bytes, hashed as they are read
    tar_members(stream)        every tar member in order, by tarfile's own stream-mode iteration
                               ("r|*": plain or compressed tars), as `TarMember`s
    shard_files(members, url)  the regular files that webdataset's tar_file_iterator yields
                               ({"fname", "data", "__url__"}; its meta files skipped)
    group_by_keys(files)       webdataset's grouping into samples {"__key__", "<suffix>": bytes}
    ShardReader.records        decoded, checked `ImageRecord`s, the bad-data policy applied,
                               the sample count and the sha256 compared with the manifest

Only public APIs of tarfile and webdataset are used; the shard is read once, front to back, so
S3 objects stream without seeking.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import tarfile
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import IO, Any, BinaryIO, Literal

from webdataset.tariterators import group_by_keys
from webdataset.tariterators import meta_prefix as wds_meta_prefix
from webdataset.tariterators import meta_suffix as wds_meta_suffix

from data_shards.format import EXPECTED_CAPTIONS, ImageRecord, ShardFormatError, decode_sample, record_problems
from data_shards.split import ShardRef, SplitSpec
from data_shards.storage import open_url

log = logging.getLogger(__name__)

BadDataPolicy = Literal["strict", "skip"]
ChecksumMode = Literal["stream", "before", "off"]
BAD_DATA_POLICIES: tuple[BadDataPolicy, ...] = ("strict", "skip")
CHECKSUM_MODES: tuple[ChecksumMode, ...] = ("stream", "before", "off")

CHUNK_SIZE = 1 << 20
_SKIP_META = re.compile(r"__[^/]*__($|/)")  # webdataset.tariterators.tar_file_iterator's skip_meta


class ShardStream:
    """A forward-only read stream over a shard that hashes every byte read through it (unless
    `hashing` is off); tarfile's stream mode needs nothing but `read`. `drain` reads the rest
    (tarfile stops at the end-of-archive blocks, before the padding) so the hash covers the file."""

    def __init__(self, raw: IO[bytes], url: str, hashing: bool = True) -> None:
        self._raw = raw
        self.url = url
        self._digest = hashlib.sha256() if hashing else None

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        if self._digest is not None:
            self._digest.update(data)
        return data

    def drain(self) -> None:
        while self.read(CHUNK_SIZE):
            pass

    def hexdigest(self) -> str | None:
        return None if self._digest is None else self._digest.hexdigest()

    def __str__(self) -> str:
        return self.url


@dataclass(slots=True)
class TarMember:
    """A tar member: its name, whether it is a regular file, and its data (None for other
    members and for files the caller did not want)."""

    name: str
    is_file: bool
    data: bytes | None


def tar_members(stream: ShardStream | IO[bytes], wanted: Callable[[str], bool] | None = None) -> Iterator[TarMember]:
    """Every member of the tar read from `stream`, in order (tarfile's stream mode, which also
    unpacks gzip/bz2/xz tars). Raises tarfile.TarError when the tar is damaged; note that stream
    mode ends silently at a damaged header after the first one, which is why readers compare the
    sample count with the manifest's. Data is read for regular files that `wanted` accepts."""
    with tarfile.open(fileobj=stream, mode="r|*") as tar:  # type: ignore[call-overload]
        for info in tar:
            data = None
            if info.isreg() and (wanted is None or wanted(info.name)):
                handle = tar.extractfile(info)
                data = handle.read() if handle is not None else b""
            yield TarMember(info.name, info.isreg(), data)
            tar.members.clear()  # TarFile lists every member it has seen; nothing here needs them


def is_webdataset_file(name: str) -> bool:
    """Whether webdataset's tar_file_iterator yields a regular file of this name (it skips its
    meta files: `__name__` at the top level and anything under `__dir__/`)."""
    if "/" not in name and name.startswith(wds_meta_prefix) and name.endswith(wds_meta_suffix):
        return False
    return not _SKIP_META.match(name)


def shard_files(stream: ShardStream | IO[bytes], url: str,
                select: Callable[[str], bool] | None = None) -> Iterator[dict[str, Any]]:
    """The shard's files as webdataset's tar_file_iterator yields them ({"fname", "data",
    "__url__"}), for webdataset's group_by_keys; `select` narrows them by name (nothing else is
    kept in memory). Errors name the shard, as webdataset's do (" @ <url>")."""
    try:
        for member in tar_members(stream, lambda name: is_webdataset_file(name) and (select is None or select(name))):
            if member.data is not None:
                yield {"fname": member.name, "data": member.data, "__url__": url}
    except Exception as exc:
        if exc.args:
            exc.args = (f"{exc.args[0]} @ {url}",) + exc.args[1:]
        raise


def shard_samples(stream: ShardStream | IO[bytes], url: str) -> Iterator[dict[str, Any]]:
    """The shard's samples, grouped by key by webdataset's group_by_keys."""
    return group_by_keys(shard_files(stream, url))


def sample_problems(record: ImageRecord, feature_shape: tuple[int, int], feature_dtype: str, split: str,
                    need_boxes: bool = False) -> list[str]:
    """What is wrong with a decoded sample against its manifest (empty when nothing is)."""
    problems = record_problems(record, feature_shape, feature_dtype)
    if need_boxes and record.boxes is None:
        problems.append("no boxes (region_order='area' needs them)")
    if split and record.split != split:
        problems.append(f"split {record.split!r} != manifest split {split!r}")
    return problems


def problem_reason(problem: str) -> str:
    """A short stats label for a phrase of `sample_problems` or a decoding error."""
    for prefix, reason in (("feature shape", "feature_shape"), ("feature dtype", "feature_dtype"),
                           ("features contain", "nonfinite"), ("boxes", "boxes"), ("no boxes", "missing_boxes"),
                           ("no captions", "no_captions"), ("split", "split")):
        if problem.startswith(prefix):
            return reason
    if problem.startswith("caption") and "empty" in problem:
        return "empty_caption"
    return "invalid_sample"


def open_shard(url: str, storage_options: Mapping[str, Any] | None = None) -> BinaryIO:
    """The shard's bytes, from a local path, file:// or s3:// URL (storage.open_url)."""
    return open_url(url, storage_options)


class ShardReader:
    """Turns shards into checked `ImageRecord`s in the calling process, applying the policy.

    The policy (`bad_data`) is "strict" (raise ShardFormatError naming the shard and the sample
    key) or "skip" (skip, log one warning per shard in this process, count in `counts`).
    Checksums: "stream" hashes while parsing (a mismatch is known at the end of the shard),
    "before" copies the shard into a spooled temporary file while hashing and parses it only if
    it matches, "off" trusts the bytes. Counters go to `self.counts`; the caller moves them into
    its batches (`take_counts`).
    """

    def __init__(self, spec: SplitSpec, bad_data: BadDataPolicy = "strict", checksums: ChecksumMode = "stream",
                 need_boxes: bool = False, spool_bytes: int = 256 << 20) -> None:
        self.spec = spec
        self.policy = bad_data
        self.checksums = checksums
        self.need_boxes = need_boxes
        self.spool_bytes = spool_bytes
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
        problems = sample_problems(record, self.spec.feature_shape, self.spec.feature_dtype, self.spec.split,
                                   self.need_boxes)
        if problems:
            self._sample_problem(shard, problem_reason(problems[0]), f"{shard.url}: sample {key}: {'; '.join(problems)}")
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
            raw = open_shard(shard.url, self.spec.storage_options)
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
            stream = ShardStream(source, shard.url, hashing=self.checksums == "stream")
            samples = shard_samples(stream, shard.url)
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
