"""Storage helpers against a local directory and a real (moto) S3 server."""

from __future__ import annotations

import hashlib
import io
import multiprocessing
import os
import stat
import threading
from pathlib import Path
from typing import Any

import pytest

from data_shards import storage
from data_shards.storage import (
    StorageError,
    UrlOpener,
    filesystem,
    open_location,
    open_url,
    s3_storage_options,
    sha256_stream,
)


def test_s3_options_precedence() -> None:
    env = {"AWS_ENDPOINT_URL": "http://general", "AWS_ENDPOINT_URL_S3": "http://s3-specific",
           "AWS_DEFAULT_REGION": "eu-west-1", "AWS_REGION": "eu-west-3",
           "AWS_ACCESS_KEY_ID": "env-key", "AWS_SECRET_ACCESS_KEY": "env-secret"}
    # Credentials stay with botocore's chain (session tokens, profiles, roles) unless explicit.
    assert s3_storage_options(environ=env) == {"endpoint_url": "http://s3-specific",
                                               "client_kwargs": {"region_name": "eu-west-3"}}
    assert s3_storage_options(environ={"AWS_ENDPOINT_URL": "http://general", "AWS_DEFAULT_REGION": "r"}) == {
        "endpoint_url": "http://general", "client_kwargs": {"region_name": "r"}}
    explicit = s3_storage_options("http://explicit", "k", "s", "ap-south-1", environ=env)
    assert explicit == {"endpoint_url": "http://explicit", "key": "k", "secret": "s",
                        "client_kwargs": {"region_name": "ap-south-1"}}
    assert s3_storage_options(environ={}) == {}
    with pytest.raises(StorageError, match="both"):
        s3_storage_options(key="k", environ={})


def test_unsupported_locations() -> None:
    with pytest.raises(StorageError, match="unsupported location scheme 'gs'"):
        open_location("gs://bucket/x")
    with pytest.raises(StorageError, match="needs a bucket"):
        open_location("s3:///x", {})


def test_local_atomic_write_list_read_hash(tmp_path: Path) -> None:
    location = open_location(str(tmp_path / "out"))
    assert location.list() == [] and not location.exists("a.tar")
    sha = location.write_bytes_atomic("a.tar", b"first")
    assert sha == hashlib.sha256(b"first").hexdigest() == location.sha256("a.tar")
    assert location.read_bytes("a.tar") == b"first"
    mode = stat.S_IMODE(os.stat(tmp_path / "out" / "a.tar").st_mode)
    assert mode & 0o044, "published files are readable by others like open() would make them (umask)"

    with pytest.raises(RuntimeError, match="boom"):
        with location.atomic_writer("a.tar") as (stream, _):
            stream.write(b"half-written replacement")
            raise RuntimeError("boom")
    assert location.read_bytes("a.tar") == b"first", "a failed write leaves the old file"
    assert sorted(os.listdir(tmp_path / "out")) == ["a.tar"], "no temporary file is left behind"

    location.write_bytes_atomic("sub/b.json", b"{}")
    location.write_bytes_atomic("c.tar", b"x")
    assert location.list(".tar") == ["a.tar", "c.tar"]  # files directly in it, not subdirectories
    assert location.child("sub").list() == ["b.json"]
    assert location.total_bytes() == len(b"first") + len(b"{}") + len(b"x")  # subdirectories included
    assert location.child("missing").total_bytes() == 0
    location.remove("c.tar")
    assert location.list() == ["a.tar"]
    with pytest.raises(FileNotFoundError, match="nope.tar: not found"):
        location.read_bytes("nope.tar")


def test_sha256_stream_chunks() -> None:
    data = os.urandom(3 * storage.CHUNK_SIZE + 17)
    assert sha256_stream(io.BytesIO(data), chunk_size=1000) == hashlib.sha256(data).hexdigest()


def test_s3_location(s3_server: Any, s3_bucket: str) -> None:
    location = open_location(f"s3://{s3_bucket}/some/prefix/", s3_server.storage_options)
    assert location.url == f"s3://{s3_bucket}/some/prefix" and location.is_s3
    location.makedirs()  # the bucket exists: nothing to do
    assert location.list() == []
    location.write_bytes_atomic("x.tar", b"payload")
    with pytest.raises(RuntimeError):
        with location.atomic_writer("y.tar") as (stream, _):
            stream.write(b"partial")
            raise RuntimeError("interrupted upload")
    assert location.list() == ["x.tar"], "an interrupted write publishes no object"
    assert location.read_bytes("x.tar") == b"payload"
    location.write_bytes_atomic("sub/z.json", b"{}")
    assert location.total_bytes() == len(b"payload") + len(b"{}")
    location.remove("sub/z.json")
    assert location.sha256("x.tar") == hashlib.sha256(b"payload").hexdigest()
    assert location.child_url("x.tar") == f"s3://{s3_bucket}/some/prefix/x.tar"
    with open_url(location.child_url("x.tar"), s3_server.storage_options) as stream:
        assert stream.read() == b"payload"
    missing = open_location(f"s3://no-such-bucket-{s3_bucket}/p", s3_server.storage_options)
    with pytest.raises(StorageError, match="does not exist"):
        missing.makedirs()


def test_environment_configures_s3(s3_env: Any, s3_bucket: str) -> None:
    location = open_location(f"s3://{s3_bucket}/env")  # no explicit options: AWS_* variables
    assert location.storage_options == {"endpoint_url": s3_env.endpoint_url,
                                        "client_kwargs": {"region_name": s3_env.region}}
    location.write_bytes_atomic("f.txt", b"from env")
    assert s3_env.client().get_object(Bucket=s3_bucket, Key="env/f.txt")["Body"].read() == b"from env"


def test_local_open_url(tmp_path: Path) -> None:
    (tmp_path / "a.tar").write_bytes(b"local")
    for url in (str(tmp_path / "a.tar"), f"file://{tmp_path}/a.tar"):
        with open_url(url) as stream:
            assert stream.read() == b"local"
    with pytest.raises(ValueError, match="modes"):
        open_url(str(tmp_path / "a.tar"), mode="r")


def test_url_opener_as_webdataset_gopen_handler(s3_server: Any, s3_bucket: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import webdataset as wds

    open_location(f"s3://{s3_bucket}", s3_server.storage_options).write_bytes_atomic("o.bin", b"via gopen")
    monkeypatch.setitem(wds.gopen_schemes, "s3", UrlOpener(s3_server.storage_options))
    with wds.gopen(f"s3://{s3_bucket}/o.bin") as stream:
        assert stream.read() == b"via gopen"


def _child_reads(url: str, options: dict[str, Any], parent_fs_id: int, queue: Any) -> None:
    try:
        with open_url(url, options) as stream:
            data = stream.read()
        queue.put((data, id(filesystem("s3", options)) == parent_fs_id, os.getpid()))
    except BaseException as exc:  # report to the parent instead of dying silently
        queue.put((repr(exc), None, os.getpid()))


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_open_url_builds_its_own_filesystem_in_each_process(s3_server: Any, s3_bucket: str, method: str) -> None:
    """A loader worker (forked or spawned) opens s3:// URLs with a filesystem made in that worker."""
    options = s3_server.storage_options
    location = open_location(f"s3://{s3_bucket}", options)
    location.write_bytes_atomic("shard.tar", b"worker data")
    parent_fs = filesystem("s3", options)
    assert parent_fs is location.fs, "one cached instance per process and options"
    with open_url(location.child_url("shard.tar"), options) as stream:  # the parent's loop is running now
        assert stream.read() == b"worker data"
    context = multiprocessing.get_context(method)
    queue = context.Queue()
    process = context.Process(target=_child_reads,
                              args=(location.child_url("shard.tar"), options, id(parent_fs), queue))
    process.start()
    data, same_instance, pid = queue.get(timeout=60)
    process.join(timeout=60)
    assert data == b"worker data"
    assert pid != os.getpid() and same_instance is False


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_listing_trees_and_downloads(kind: str, tmp_path: Path, s3_server: Any, s3_bucket: str) -> None:
    if kind == "local":
        location = open_location(str(tmp_path / "run"))
        location.makedirs()
    else:
        location = open_location(f"s3://{s3_bucket}/tree-{tmp_path.name}", s3_server.storage_options)
    location.write_bytes_atomic("a.json", b"12345")
    location.child("checkpoint_1").write_bytes_atomic("w.bin", b"weights")
    location.child("checkpoint_1").child("inner").write_bytes_atomic("x", b"x")
    entries = location.entries()
    assert [(e.name, e.is_dir) for e in entries] == [("a.json", False), ("checkpoint_1", True)]
    assert entries[0].size == 5
    assert location.subdirectories() == ["checkpoint_1"]
    location.download("a.json", tmp_path / "copy.json")
    assert (tmp_path / "copy.json").read_bytes() == b"12345"
    with pytest.raises(FileNotFoundError, match="nope: not found"):
        location.download("nope", tmp_path / "nope")
    with location.child("checkpoint_1").local_directory(["w.bin"]) as directory:
        assert (Path(directory) / "w.bin").read_bytes() == b"weights"
    with pytest.raises(FileNotFoundError, match="missing.bin: not found"):
        with location.child("checkpoint_1").local_directory(["missing.bin"]):
            pass
    location.remove_tree("checkpoint_1")
    assert location.subdirectories() == [] and location.list() == ["a.json"]
    assert location.display == (location.url if kind == "s3" else location.path)
    assert open_location(str(tmp_path / "absent")).entries() == []


def test_local_lock_excludes_other_writers(tmp_path: Path) -> None:
    """`locked` serializes read-modify-writes of one file: a second writer (another thread here;
    flock works alike across processes) waits until the first has published its version."""
    location = open_location(str(tmp_path / "run"))
    order: list[str] = []

    def second_writer() -> None:
        with location.locked("history.jsonl"):
            order.append("second: " + location.read_text("history.jsonl"))

    with location.locked("history.jsonl"):
        thread = threading.Thread(target=second_writer)
        thread.start()
        thread.join(0.5)
        assert thread.is_alive(), "the second writer must wait for the lock"
        location.write_bytes_atomic("history.jsonl", b"first\n")
        order.append("first")
    thread.join(30)
    assert order == ["first", "second: first\n"]
    # The lock file stays beside the file it guards (hidden), whatever the file's directory.
    with location.locked("sub/x.json"):
        pass
    assert sorted(os.listdir(tmp_path / "run")) == [".lock-history.jsonl", "history.jsonl", "sub"]
    assert os.listdir(tmp_path / "run" / "sub") == [".lock-x.json"]


def test_s3_lock_holds_nothing(s3_server: Any, s3_bucket: str) -> None:
    location = open_location(f"s3://{s3_bucket}/run", s3_server.storage_options)
    with location.locked("history.jsonl"):
        location.write_bytes_atomic("history.jsonl", b"line\n")
    assert location.list() == ["history.jsonl"]  # no lock object: S3 has no locks to take
    assert location.read_bytes("history.jsonl") == b"line\n"


def _location_of(kind: str, tmp_path: Path, s3_server: Any, s3_bucket: str) -> Any:
    if kind == "local":
        return open_location(str(tmp_path / "run"))
    return open_location(f"s3://{s3_bucket}/run", s3_server.storage_options)


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_conditional_writes_create_only_if_absent_and_replace_or_delete_only_if_unchanged(
        kind: str, tmp_path: Path, s3_server: Any, s3_bucket: str) -> None:
    # On S3 these are If-None-Match / If-Match requests: moto >= 5.2.5 answers 412 when they fail.
    location = _location_of(kind, tmp_path, s3_server, s3_bucket)
    location.makedirs()
    with pytest.raises(FileNotFoundError, match="lease.json"):
        location.read_bytes_versioned("lease.json")
    assert location.write_bytes_if("lease.json", b"first", None)
    assert not location.write_bytes_if("lease.json", b"second", None)  # exists: not replaced
    data, version = location.read_bytes_versioned("lease.json")
    assert data == b"first"
    assert not location.write_bytes_if("lease.json", b"stale", "0123456789abcdef")  # another version
    assert location.write_bytes_if("lease.json", b"third", version)
    assert location.read_bytes("lease.json") == b"third"
    assert not location.write_bytes_if("lease.json", b"late", version)  # it changed since `version`
    assert not location.remove_if("lease.json", version)
    data, current = location.read_bytes_versioned("lease.json")
    assert data == b"third" and current != version
    assert location.remove_if("lease.json", current) and not location.exists("lease.json")
    assert not location.remove_if("lease.json", current)  # gone
    assert not location.write_bytes_if("lease.json", b"x", current)  # If-Match on nothing fails
    # Nothing left behind but, locally, the hidden lock file of the check-and-write.
    assert location.list() == ([] if location.is_s3 else [".lock-lease.json"])


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_racing_conditional_creates_have_exactly_one_winner(
        kind: str, tmp_path: Path, s3_server: Any, s3_bucket: str) -> None:
    location = _location_of(kind, tmp_path, s3_server, s3_bucket)
    location.makedirs()
    start = threading.Barrier(8)
    results: dict[int, bool] = {}

    def create(index: int) -> None:
        start.wait()
        results[index] = location.write_bytes_if("owner.json", f"writer {index}".encode(), None)

    threads = [threading.Thread(target=create, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    winners = [i for i, won in results.items() if won]
    assert len(results) == 8 and len(winners) == 1, results
    assert location.read_bytes("owner.json") == f"writer {winners[0]}".encode()
