"""Where shards live: one place that turns a location into an fsspec filesystem and a path.

A location is a local directory (`/data/coco/test`, `file:///data/coco/test`) or an S3 prefix
(`s3://bucket/coco/test`, through s3fs). `open_location` gives a `Location` with the operations
its users need: list (with sizes and subdirectories), read, hash, download, publish a file
atomically, remove a file or a tree.

Why it lives in data_shards/: shards are what it was made for, and data_shards/ is the lowest
layer that does I/O (it imports nothing of model/ or trainer/), so the trainer can use the same
protocol for run directories (trainer/run/) without data_shards/ knowing of runs.

S3 configuration, explicit values first, then the environment:

- endpoint: `endpoint_url=` / `--endpoint-url`, else `AWS_ENDPOINT_URL_S3`, else `AWS_ENDPOINT_URL`
  (botocore's own precedence: the service-specific variable wins). botocore would read both
  itself; resolving them here makes the endpoint visible in logs and explicit in the options that
  are handed to loader workers.
- region: `region=`, else `AWS_REGION`, else `AWS_DEFAULT_REGION`. botocore reads only
  `AWS_DEFAULT_REGION` (checked with botocore 1.43), so `AWS_REGION` must be passed explicitly.
- credentials: `key=` / `secret=` when given; otherwise they are left to botocore's default chain,
  which reads `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, profiles and
  instance/pod roles. Copying them into the options would lose the session token and the roles.

Atomicity: a local file is written to a hidden temporary file in the same directory and renamed
over the destination with `os.replace`; an S3 object appears only when its PUT (or multipart
upload) completes, so the data are first written to a local temporary file and then uploaded.
Writers that publish several files (the converter) write their index (`manifest.json`) last.

Read-modify-write (`Location.locked`): locally, cooperating writers of one file take an `flock` on
a hidden lock file beside it, so two processes appending to the same file never lose each other's
update. S3 has no locks: nothing is held there, and the later of two racing uploads wins; callers
say why that is acceptable for their file (trainer/run/history.py, the evaluation history).

Conditional writes (`read_bytes_versioned`, `write_bytes_if`, `remove_if`): compare-and-swap on one
small file, for records that only one writer may own (trainer/run/lease.py). Locally the check and
the write happen under that same `flock`, so racing writers are serialized, and the version is the
content's sha256. On S3 they are single conditional requests: PutObject with `If-None-Match: *`
(create only if absent) or `If-Match: <ETag>` (replace only if unchanged), DeleteObject with
`If-Match`; a 412 (or 409 ConditionalRequestConflict) means another writer got there first. AWS S3
honours all three, and so does moto >= 5.2.5 (the tests' server). A store that answers
501 NotImplemented gets an unconditional write instead, with a warning: the caller's own checks
(reading its record back) are all that is left there. A store that silently ignores the headers
cannot be told apart from one that honours them: there the later of two racing writers wins.

fsspec filesystem instances are not fork-safe ("This class is not fork-safe" in fsspec's docs):
`filesystem()` caches one instance per (process id, protocol, options), created with
`skip_instance_cache=True` so a forked child never reuses its parent's instance. `open_url` is the
function for data-loader workers: it builds the filesystem lazily in whichever process calls it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import tempfile
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Any, BinaryIO
from urllib.parse import unquote, urlparse

import fsspec

logger = logging.getLogger(__name__)

CHUNK_SIZE = 1 << 20
TEMP_PREFIX = ".tmp-"  # hidden temporary files of atomic local writes; never valid shard names
LOCK_PREFIX = ".lock-"  # hidden lock files of `Location.locked`, beside the file they guard

_FS_CACHE: dict[tuple[int, str, str], fsspec.AbstractFileSystem] = {}


def _current_umask() -> int:
    # os.umask can only be read by setting it; done once, at import, before any threads of ours.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# mkstemp creates 0600 files; published files get the permissions `open` would have given them.
_FILE_MODE = 0o666 & ~_current_umask()
_FS_CACHE_LOCK = threading.Lock()


class StorageError(OSError):
    """A location cannot be used (malformed, missing, unreadable); the message names it."""


# S3 error codes of a conditional request (Location.write_bytes_if, remove_if): the condition did
# not hold, or a concurrent conditional write to the same key won (AWS answers 409 then).
_S3_CONDITION_FAILED = frozenset({"PreconditionFailed", "412", "ConditionalRequestConflict", "409"})
_S3_NOT_IMPLEMENTED = frozenset({"NotImplemented", "501"})


def _s3_error_code(error: BaseException) -> str | None:
    """The S3 error code behind an s3fs error (s3fs keeps botocore's ClientError as the cause)."""
    for candidate in (error, error.__cause__):
        response = getattr(candidate, "response", None)
        if isinstance(response, dict):
            return str(response.get("Error", {}).get("Code"))
    return None


def is_s3_url(location: str) -> bool:
    """Whether `location` is an `s3://` (or `s3a://`) URL."""
    return urlparse(location).scheme in ("s3", "s3a")


def s3_storage_options(
    endpoint_url: str | None = None,
    key: str | None = None,
    secret: str | None = None,
    region: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """s3fs keyword arguments from explicit values, falling back to the environment.

    Only what is set appears in the result, so an empty dict means "all s3fs/botocore defaults".
    The result holds secrets when `key`/`secret` are given: never log it.
    """
    env = os.environ if environ is None else environ
    endpoint = endpoint_url or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    region_name = region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    if (key is None) != (secret is None):
        raise StorageError("S3 credentials need both an access key and a secret key")
    options: dict[str, Any] = {}
    if endpoint:
        options["endpoint_url"] = endpoint
    if key is not None:
        options["key"] = key
        options["secret"] = secret
    if region_name:
        options["client_kwargs"] = {"region_name": region_name}
    return options


def _options_token(options: Mapping[str, Any]) -> str:
    try:
        return json.dumps(options, sort_keys=True, default=repr)
    except TypeError as exc:  # pragma: no cover - default=repr makes everything serializable
        raise StorageError(f"storage options are not serializable: {exc}") from exc


def filesystem(protocol: str, storage_options: Mapping[str, Any] | None = None) -> fsspec.AbstractFileSystem:
    """The filesystem for `protocol` ("file" or "s3") in this process, created on first use.

    Cached per (pid, protocol, options): after a fork the child builds its own instance instead of
    using the parent's (whose event loop and connections belong to the parent).
    """
    protocol = "s3" if protocol in ("s3", "s3a") else protocol
    options = dict(storage_options or {})
    if protocol == "file":
        options = {}  # local paths need no options; S3 options passed along are irrelevant here
    cache_key = (os.getpid(), protocol, _options_token(options))
    with _FS_CACHE_LOCK:
        fs = _FS_CACHE.get(cache_key)
        if fs is None:
            if protocol == "s3":
                endpoint = options.get("endpoint_url")
                logger.debug("creating s3fs filesystem in pid %d (endpoint %s)", os.getpid(), endpoint or "default")
            fs = fsspec.filesystem(protocol, skip_instance_cache=True, **options)
            _FS_CACHE[cache_key] = fs
        return fs


def _split_url(url: str) -> tuple[str, str]:
    """(protocol, filesystem path) of a local path, `file://` URL or `s3://` URL."""
    parsed = urlparse(url)
    if parsed.scheme in ("s3", "s3a"):
        if not parsed.netloc:
            raise StorageError(f"{url}: an S3 URL needs a bucket (s3://bucket/prefix)")
        return "s3", f"{parsed.netloc}/{parsed.path.lstrip('/')}".rstrip("/")
    if parsed.scheme == "file":
        return "file", os.path.abspath(unquote(parsed.path))
    if parsed.scheme == "" or len(parsed.scheme) == 1:  # "" or a Windows drive letter
        return "file", os.path.abspath(url)
    raise StorageError(f"{url}: unsupported location scheme {parsed.scheme!r} (use a local path or s3://)")


def open_url(url: str, storage_options: Mapping[str, Any] | None = None, mode: str = "rb") -> BinaryIO:
    """Open a shard by URL for reading (or writing): a local path, `file://` or `s3://`.

    Meant for WebDataset readers inside data-loader workers: the S3 filesystem is created lazily in
    the calling process (see `filesystem`), so it is safe under fork and spawn. For example:

        import webdataset as wds
        wds.gopen_schemes["s3"] = UrlOpener(storage_options)   # or call open_url in a url_opener

    `storage_options` are s3fs keyword arguments, e.g. from `s3_storage_options()` or
    `Location.storage_options`; None reads them from the environment (in the calling process). They
    must be picklable plain data when handed to spawned workers. Local files open with `open`.
    """
    if mode not in ("rb", "wb"):
        raise ValueError(f"open_url supports modes 'rb' and 'wb', got {mode!r}")
    protocol, path = _split_url(url)
    if protocol == "file":
        return open(path, mode)  # noqa: SIM115 - the caller owns the stream
    options = s3_storage_options() if storage_options is None else storage_options
    try:
        return filesystem(protocol, options).open(path, mode)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{url}: no such object") from exc


@dataclass(frozen=True)
class UrlOpener:
    """A picklable `gopen`-style handler (`handler(url, mode, bufsize, **kw)`) that calls
    `open_url` with fixed storage options (None: the environment of the process that opens);
    register it in `webdataset.gopen_schemes["s3"]`."""

    storage_options: dict[str, Any] | None = None

    def __call__(self, url: str, mode: str = "rb", bufsize: int = 8192, **kwargs: Any) -> BinaryIO:
        return open_url(url, self.storage_options, mode)


def sha256_stream(stream: IO[bytes], chunk_size: int = CHUNK_SIZE) -> str:
    """Hex sha256 of everything left in a binary stream, read in chunks (flat memory)."""
    digest = hashlib.sha256()
    while chunk := stream.read(chunk_size):
        digest.update(chunk)
    return digest.hexdigest()


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a local file."""
    with open(path, "rb") as stream:
        return sha256_stream(stream)


class HashingWriter:
    """A write-only binary stream that hashes and counts what passes through it."""

    def __init__(self, stream: IO[bytes]) -> None:
        self._stream = stream
        self._digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self._digest.update(data)
        self.size += len(data)
        return self._stream.write(data)

    def flush(self) -> None:
        self._stream.flush()

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


@dataclass
class WriteResult:
    """What `Location.atomic_writer` published: filled in when the `with` block exits cleanly."""

    name: str
    sha256: str = ""
    size: int = 0


@dataclass(frozen=True)
class Entry:
    """One entry of a location's listing."""

    name: str
    size: int  # bytes; 0 for directories
    is_dir: bool


@dataclass
class Location:
    """A directory or S3 prefix holding files, addressed by name: the one storage protocol of the
    project. Shards (data_shards/) and run directories (trainer/run/) go through it, so no
    caller branches on local versus S3 or touches `fs`."""

    url: str  # "s3://bucket/prefix", or the local path as given, without a trailing slash
    protocol: str  # "file" or "s3"
    fs: fsspec.AbstractFileSystem
    path: str  # the filesystem path of the directory (bucket/prefix on S3, absolute locally)
    storage_options: dict[str, Any]  # may hold secrets: never log

    @property
    def is_s3(self) -> bool:
        return self.protocol == "s3"

    def child_path(self, name: str) -> str:
        """The filesystem path of file `name` in this location."""
        return f"{self.path}/{name}"

    def child_url(self, name: str) -> str:
        """A URL of file `name` that `open_url` (and so a WebDataset reader) understands."""
        return f"{self.url}/{name}" if self.is_s3 else os.path.join(self.path, name)

    def child(self, name: str) -> Location:
        """The subdirectory (sub-prefix) `name` of this location, on the same filesystem."""
        return Location(url=f"{self.url}/{name}" if self.is_s3 else os.path.join(self.url, name),
                        protocol=self.protocol, fs=self.fs, path=self.child_path(name),
                        storage_options=self.storage_options)

    @property
    def display(self) -> str:
        """How the location is named in files and messages: the s3:// URL or the absolute local path."""
        return self.url if self.is_s3 else self.path

    def invalidate(self) -> None:
        """Forget cached listings: s3fs caches them, and other processes (converter workers, the
        trainer beside an evaluator) write behind its back. Every listing here calls it first."""
        self.fs.invalidate_cache(self.path)

    def entries(self) -> list[Entry]:
        """What is directly in this location, sorted by name: files with their sizes, and
        directories (S3: common prefixes); [] if the location does not exist."""
        self.invalidate()
        try:
            listed = self.fs.ls(self.path, detail=True)
        except FileNotFoundError:
            return []
        out = [Entry(name=item["name"].rstrip("/").rsplit("/", 1)[-1], size=int(item.get("size") or 0),
                     is_dir=item.get("type") == "directory") for item in listed]
        return sorted(out, key=lambda e: e.name)

    def total_bytes(self) -> int:
        """Bytes of every file under this location, subdirectories included; 0 if it does not exist."""
        self.invalidate()
        try:
            return int(self.fs.du(self.path, total=True))
        except FileNotFoundError:
            return 0

    def subdirectories(self) -> list[str]:
        """Names of the directories (S3: common prefixes) directly in this location, sorted."""
        return [e.name for e in self.entries() if e.is_dir]

    @contextlib.contextmanager
    def locked(self, name: str) -> Iterator[None]:
        """Hold the lock of file `name` for a read-modify-write among cooperating writers.

        Local: an exclusive `flock` on the hidden file `.lock-<name>` beside it, created on first
        use and left in place (deleting it would let a waiter and a newcomer lock two different
        files). flock locks belong to an open file description, so the lock also excludes other
        threads of this process, and on Linux it works on NFS too (emulated with POSIX locks).
        S3 has no locks: nothing is held, so the later of two racing writers wins there.
        """
        if self.is_s3:
            yield
            return
        directory, base = os.path.split(self.child_path(name))
        os.makedirs(directory, exist_ok=True)
        descriptor = os.open(os.path.join(directory, f"{LOCK_PREFIX}{base}"), os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            yield
        finally:
            os.close(descriptor)  # closing the descriptor releases the lock

    def remove_tree(self, name: str) -> None:
        """Delete the subdirectory (sub-prefix) `name` and everything under it."""
        self.fs.rm(self.child_path(name), recursive=True)
        self.invalidate()

    @contextlib.contextmanager
    def local_directory(self, names: Sequence[str]) -> Iterator[str]:
        """A local directory holding the files `names` of this location: the directory itself
        when it is local, else a temporary copy (removed on exit). FileNotFoundError names a
        missing file."""
        if not self.is_s3:
            for name in names:
                if not os.path.exists(self.child_path(name)):
                    raise FileNotFoundError(f"{self.child_url(name)}: not found")
            yield self.path
            return
        with tempfile.TemporaryDirectory(prefix="vsrn-download-") as temporary:
            for name in names:
                self.download(name, os.path.join(temporary, name))
            yield temporary

    def download(self, name: str, destination: str | os.PathLike[str]) -> None:
        """Copy file `name` to the local path `destination`; FileNotFoundError names the file."""
        try:
            self.fs.get_file(self.child_path(name), os.fspath(destination))
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"{self.child_url(name)}: not found") from exc

    def exists(self, name: str) -> bool:
        self.invalidate()
        return bool(self.fs.exists(self.child_path(name)))

    def list(self, suffix: str = "") -> list[str]:
        """Names of the files directly in this location ending with `suffix`, sorted."""
        self.invalidate()
        try:
            entries = self.fs.ls(self.path, detail=True)
        except FileNotFoundError:
            return []
        names = []
        for entry in entries:
            if entry.get("type") != "file":
                continue
            name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
            if name.endswith(suffix):
                names.append(name)
        return sorted(names)

    def size(self, name: str) -> int:
        return int(self.fs.size(self.child_path(name)))

    def open_read(self, name: str) -> BinaryIO:
        """A binary stream of file `name`; FileNotFoundError names the file."""
        try:
            return self.fs.open(self.child_path(name), "rb")
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"{self.child_url(name)}: not found") from exc

    def read_bytes(self, name: str) -> bytes:
        if not self.is_s3:
            # A plain sequential read: no fsspec buffering or seeking (a FIFO, a file being replaced).
            try:
                with open(self.child_path(name), "rb") as stream:
                    return stream.read()
            except FileNotFoundError as exc:
                raise FileNotFoundError(f"{self.child_url(name)}: not found") from exc
        with self.open_read(name) as stream:
            return stream.read()

    def read_text(self, name: str) -> str:
        data = self.read_bytes(name)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise StorageError(f"{self.child_url(name)}: not UTF-8 ({exc})") from exc

    def sha256(self, name: str) -> str:
        with self.open_read(name) as stream:
            return sha256_stream(stream)

    def remove(self, name: str) -> None:
        self.fs.rm_file(self.child_path(name))
        self.invalidate()

    def remove_if_empty(self) -> None:
        """Remove this directory if it is empty (S3 prefixes vanish with their last object)."""
        if not self.is_s3:
            with contextlib.suppress(OSError):
                os.rmdir(self.path)

    def makedirs(self) -> None:
        """Create the local directory (S3 prefixes need no creation; the bucket must exist)."""
        if self.is_s3:
            bucket = self.path.split("/", 1)[0]
            try:
                found = self.fs.exists(bucket)
            except PermissionError as exc:
                raise StorageError(f"{self.url}: access to bucket {bucket!r} denied ({exc})") from exc
            if not found:
                raise StorageError(f"{self.url}: bucket {bucket!r} does not exist (create it first)")
        else:
            os.makedirs(self.path, exist_ok=True)

    @contextlib.contextmanager
    def atomic_writer(self, name: str) -> Iterator[tuple[HashingWriter, WriteResult]]:
        """Write file `name` all or nothing: yields a hashing stream and a result that holds the
        sha256 and size once the block exits cleanly. On an exception nothing is published and an
        existing file of that name is left untouched.

        Local: a hidden temporary file beside the destination, fsync, `os.replace`. S3: a local
        temporary file, then one upload (an object becomes visible only when its upload completes).
        """
        result = WriteResult(name=name)
        final_path = self.child_path(name)
        # Locally the temporary file must be on the destination's filesystem for os.replace.
        temp_dir = None if self.is_s3 else os.path.dirname(final_path)
        if temp_dir is not None:
            os.makedirs(temp_dir, exist_ok=True)
        base = name.rsplit("/", 1)[-1]
        fd, temp_path = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{base}.", dir=temp_dir)
        try:
            if temp_dir is not None:
                os.fchmod(fd, _FILE_MODE)
            with os.fdopen(fd, "wb") as raw:
                writer = HashingWriter(raw)
                yield writer, result
                raw.flush()
                os.fsync(raw.fileno())
            result.sha256, result.size = writer.hexdigest(), writer.size
            if self.is_s3:
                self.fs.put_file(temp_path, final_path)
                os.unlink(temp_path)
            else:
                os.replace(temp_path, final_path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp_path)
            raise
        finally:
            self.invalidate()

    def write_bytes_atomic(self, name: str, data: bytes) -> str:
        """Publish `data` as file `name` atomically; returns its sha256."""
        with self.atomic_writer(name) as (stream, result):
            stream.write(data)
        return result.sha256

    def read_bytes_versioned(self, name: str) -> tuple[bytes, str]:
        """File `name` and a version token of it for `write_bytes_if` / `remove_if` (module doc,
        "Conditional writes"); FileNotFoundError names the file.

        S3: the object's ETag, asked BEFORE the content is read: a write in between can only make
        the later conditional request fail (the ETag is older than the content), never let it
        replace a record this caller has not seen. Local: the sha256 of the bytes read.
        """
        if not self.is_s3:
            data = self.read_bytes(name)
            return data, hashlib.sha256(data).hexdigest()
        self.invalidate()
        try:
            etag = str(self.fs.info(self.child_path(name))["ETag"])
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"{self.child_url(name)}: not found") from exc
        return self.read_bytes(name), etag

    def write_bytes_if(self, name: str, data: bytes, version: str | None) -> bool:
        """Publish `data` as file `name` only if the file is still at `version` (from
        `read_bytes_versioned`), or only if there is no such file when `version` is None; returns
        whether it did. Readers see the old file or the whole new one."""
        if not self.is_s3:
            with self.locked(name):
                if self._local_version(name) != version:
                    return False
                self.write_bytes_atomic(name, data)
                return True
        path = self.child_path(name)
        condition = {"mode": "create"} if version is None else {"IfMatch": version}
        try:
            self.fs.pipe_file(path, data, **condition)
        except FileExistsError:  # s3fs's translation of a 412 for If-None-Match
            return False
        except FileNotFoundError:  # If-Match on an object that is gone
            return False
        except OSError as exc:
            code = _s3_error_code(exc)
            if code in _S3_CONDITION_FAILED:
                return False
            if code not in _S3_NOT_IMPLEMENTED:
                raise
            logger.warning("%s: the store does not support conditional writes (%s); writing unconditionally",
                           self.child_url(name), code)
            self.fs.pipe_file(path, data)
        finally:
            self.invalidate()
        return True

    def remove_if(self, name: str, version: str) -> bool:
        """Delete file `name` only if it is still at `version`; returns whether it did (False when
        it changed or is gone)."""
        if not self.is_s3:
            with self.locked(name):
                if self._local_version(name) != version:
                    return False
                os.unlink(self.child_path(name))
                return True
        bucket, key, _ = self.fs.split_path(self.child_path(name))
        try:
            self.fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=version)
        except FileNotFoundError:
            return False
        except OSError as exc:
            code = _s3_error_code(exc)
            if code in _S3_CONDITION_FAILED or code == "NoSuchKey":
                return False
            if code not in _S3_NOT_IMPLEMENTED:
                raise
            logger.warning("%s: the store does not support conditional deletes (%s); deleting unconditionally",
                           self.child_url(name), code)
            self.fs.rm_file(self.child_path(name))
        finally:
            self.invalidate()
        return True

    def _local_version(self, name: str) -> str | None:
        try:
            return hashlib.sha256(self.read_bytes(name)).hexdigest()
        except FileNotFoundError:
            return None


def open_location(location: str, storage_options: Mapping[str, Any] | None = None) -> Location:
    """A `Location` for a local directory or `s3://bucket/prefix`.

    For S3, `storage_options` (s3fs keyword arguments) default to `s3_storage_options()`, i.e. the
    environment. Nothing is created or contacted here.
    """
    if not location:
        raise StorageError("empty location")
    protocol, path = _split_url(location)
    if protocol == "s3":
        options = dict(s3_storage_options() if storage_options is None else storage_options)
        url = "s3://" + path
    else:
        options = {}
        url = location.rstrip("/") or location
    return Location(url=url, protocol=protocol, fs=filesystem(protocol, options), path=path,
                    storage_options=options)
