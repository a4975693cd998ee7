"""Shared pytest setup and fixtures for every test directory.

- tests/ is put on sys.path, so helper modules here (e.g. reference_layout) import by name.
- A real S3 server (moto's server mode) on 127.0.0.1, used by data_shards and trainer tests:
  `s3_server` (session): starts `moto.server.ThreadedMotoServer` on a free port and yields an
  `S3Server` with its endpoint, dummy credentials, region and `storage_options` (s3fs keyword
  arguments, as `data_shards.storage.s3_storage_options` makes them). Nothing is set in the
  environment, so tests that do not ask for S3 see no AWS variables.
  `s3_bucket` (function): a fresh, empty bucket on that server (created with boto3: s3fs's mkdir
  sends a location constraint moto rejects); yields its name, deletes it afterwards.
  `s3_env` (function): the server's endpoint and credentials as AWS_* environment variables,
  set with monkeypatch (undone after the test) — for CLIs and code that read the environment.
  Any AWS_PROFILE / AWS_SESSION_TOKEN of the machine is removed for the test's duration.
  The server keeps state for the session; isolation comes from one bucket per test.
- `make_precomp`: a factory writing a tiny split in the precomputed layout.
- `ray_local` (session): one local Ray instance for the whole session (starting Ray takes seconds).
- `embedded_default_run` (session): the embedded default (`make run`) trained once through the
  launcher on `ray_local`, with a real Prometheus scraping Ray's metrics endpoint and a Pushgateway
  running from before the job to the end of the session: the main-job tests
  (tests/trainer/test_launch.py, test_trained_interpretation.py) read its run directory, the
  monitoring test (tests/monitoring/test_prometheus_scrape.py) what Prometheus scraped of it.
- Ray Train's controller polls its workers every 0.5 s here instead of its default 2 s
  (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, set before any Ray starts, so every Ray process of the session
  and every launcher subprocess inherits it), so that a run's end is seen sooner. (What it saves
  per tiny launch was not separable from the noise of a 2-core box: 27-40 s a launch either way.)
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")

_TESTS_DIR = str(Path(__file__).resolve().parent)
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)
ROOT = Path(__file__).resolve().parents[1]

from prometheus_servers import PrometheusServer, prometheus, pushgateway, scrape_config

ACCESS_KEY = "testing-access-key"
SECRET_KEY = "testing-secret-key"
REGION = "us-east-1"


@dataclass(frozen=True)
class S3Server:
    """A running local S3 endpoint and how to reach it."""

    endpoint_url: str
    key: str = ACCESS_KEY
    secret: str = SECRET_KEY
    region: str = REGION

    @property
    def storage_options(self) -> dict[str, Any]:
        """s3fs keyword arguments (a fresh dict each time: callers may modify it)."""
        return {"endpoint_url": self.endpoint_url, "key": self.key, "secret": self.secret,
                "client_kwargs": {"region_name": self.region}}

    @property
    def env(self) -> dict[str, str]:
        """The same configuration as AWS_* environment variables."""
        return {"AWS_ENDPOINT_URL": self.endpoint_url, "AWS_ACCESS_KEY_ID": self.key,
                "AWS_SECRET_ACCESS_KEY": self.secret, "AWS_DEFAULT_REGION": self.region}

    def client(self) -> Any:
        """A boto3 S3 client for this server (for setup and inspection in tests)."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, aws_access_key_id=self.key,
                            aws_secret_access_key=self.secret, region_name=self.region)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A moto S3 server on 127.0.0.1 and a free port, for the whole test session."""
    from moto.server import ThreadedMotoServer

    # werkzeug logs every request at INFO; keep test output readable.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield S3Server(endpoint_url=f"http://{host}:{port}")
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> Iterator[str]:
    """A new empty bucket; removed (with its objects) after the test."""
    name = f"test-{uuid.uuid4().hex[:16]}"
    client = s3_server.client()
    client.create_bucket(Bucket=name)
    yield name
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=name):
        for obj in page.get("Contents", []):
            client.delete_object(Bucket=name, Key=obj["Key"])
    client.delete_bucket(Bucket=name)


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """Point the AWS_* environment at the local server for this test only."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    return s3_server


@dataclass(frozen=True)
class PrecompData:
    """What `make_precomp` wrote: features (one row per image) and captions (five per image)."""

    ims: Any  # np.ndarray (images, regions, feature_dim) float32
    captions: list[str]


@pytest.fixture
def make_precomp() -> Any:
    """A factory writing a tiny split in the precomputed layout (`{split}_ims.npy`, `{split}_caps.txt`).

    `make_precomp(directory, split, images, regions=4, dim=8, seed=0, per_caption=False)` returns a
    `PrecompData`. Captions are UTF-8 with non-ASCII characters (the reference once read them as
    bytes); `per_caption=True` writes the variant with one ims row per caption (rows repeated 5x).
    """
    import numpy as np

    def make(directory: Any, split: str, images: int, regions: int = 4, dim: int = 8, seed: int = 0,
             per_caption: bool = False) -> PrecompData:
        rng = np.random.default_rng(seed)
        ims = (rng.standard_normal((images, regions, dim)) * 3).astype(np.float32)
        captions = [f"{split} image {i} caption {k}: a café with a naïve dog №{seed}"
                    for i in range(images) for k in range(5)]
        directory.mkdir(parents=True, exist_ok=True)
        np.save(directory / f"{split}_ims.npy", np.repeat(ims, 5, axis=0) if per_caption else ims)
        (directory / f"{split}_caps.txt").write_text("".join(c + "\n" for c in captions), encoding="utf-8")
        return PrecompData(ims=ims, captions=captions)

    return make


@pytest.fixture(scope="session")
def ray_local() -> Iterator[Any]:
    """A local Ray instance (2 CPUs, no dashboard) for the whole session; yields the ray module.

    `address="local"` always starts a fresh instance: plain `ray.init()` would silently attach to
    any cluster recorded in /tmp/ray (docs: shared/NOTES.md). Shut down at the end of the session.
    """
    import ray

    if ray.is_initialized():  # started by someone else in this process: use it, leave it running
        yield ray
        return
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    try:
        yield ray
    finally:
        ray.shutdown()


@dataclass(frozen=True)
class EmbeddedRun:
    """The embedded default trained through the real launcher (see `embedded_default_run`)."""

    result: subprocess.CompletedProcess[str]  # the launcher's exit status, stdout and stderr
    run_dir: Path
    cache_dir: Path  # data.cache_dir: the synthetic dataset (shards/, images/, vocab.json)
    prometheus: PrometheusServer  # scraped Ray's metrics endpoint every second during the job
    pushgateway: str  # its URL; the same Prometheus scrapes it

    @property
    def synthetic(self) -> Path:
        [directory] = self.cache_dir.glob("synthetic-*")
        return directory


@pytest.fixture(scope="session")
def embedded_default_run(ray_local: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRun]:
    """`python trainer/launch.py` on the embedded default (configs/tiny.yaml, what `make run` runs),
    trained once per session (about 2 minutes on 2 cores), watched by Prometheus as a cluster's
    would be (monitoring/prometheus/prometheus.yml's relabelling of Ray's endpoint).

    Only where it runs differs from `make run`: the data cache and run directory are temporary, and
    the job attaches to the session's Ray (2 CPUs) through RAY_ADDRESS, as under `ray job submit`,
    with 2 workers x 0.75 CPU beside the evaluator's 0.5 CPU (resources, not numerics). Prometheus
    and the Pushgateway stop at the end of the session.
    """
    root = tmp_path_factory.mktemp("embedded_default")
    address = ray_local.get_runtime_context().gcs_address
    metrics_port = next(n["MetricsExportPort"] for n in ray_local.nodes() if n["Alive"])
    with contextlib.ExitStack() as servers:
        gateway = servers.enter_context(pushgateway(root))
        server = servers.enter_context(prometheus(root / "prometheus", scrape_config(metrics_port, gateway)))
        result = subprocess.run(
            [sys.executable, "trainer/launch.py", "--set", f"data.cache_dir={root / 'cache'}",
             "--set", f"checkpoint.storage_path={root / 'runs'}", "--set", "checkpoint.run_name=embedded",
             "--set", "distributed.cpus_per_worker=0.75"],
            cwd=ROOT, capture_output=True, text=True, check=False, timeout=900,
            env={**os.environ, "RAY_ADDRESS": address})
        yield EmbeddedRun(result=result, run_dir=root / "runs" / "embedded", cache_dir=root / "cache",
                          prometheus=server, pushgateway=gateway)
